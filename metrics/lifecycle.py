"""What one request records at each step, on each side: its lifecycle events (the
rows in ClickHouse), its Prometheus series and its trace spans. The request code
calls one method per step; these classes keep the bookkeeping out of it.

* :class:`RequestRecorder` — the API's view: admission, first token, what the client
  got in the end (each terminal step counts once).
* :class:`WorkerRecorder` — the worker's publisher thread: claims, tokens it
  shipped, releases and hand-backs (preemptions); it adds its events to the
  publisher's pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker.messages import ErrorEvent, GenerateRequest, TokenEvent
from metrics import tracing
from metrics.events import EventSink, Kind, add_to_pipeline, event
from metrics.prom import api_metrics, worker_metrics
from scheduler.claimed import Claimed



def prompt_tokens(req) -> int:
    """Prompt tokens of a text or vision request; 0 for requests without a token prompt (speech)."""
    return len(getattr(req, "prompt_token_ids", ()))


def max_tokens(req) -> int:
    params = getattr(req, "params", None)
    return params.max_tokens * params.n if params is not None else 0

class RequestRecorder:
    """``resumed``: a reader that took over a stream another one started (a client
    resuming it): it replays the output log, so it records only how the request ends,
    never its admission, first token or latencies."""

    def __init__(self, sink: EventSink | None, req: GenerateRequest, *, resumed: bool = False):
        self.sink = sink
        self.req = req
        self.tier = str(req.tier)
        self.m = api_metrics()
        self.resumed = resumed
        self._token_series = None
        """(ttft, itl, generation tokens) labelled once, at the first token: ``labels()`` takes
        a lock and a lookup, and tokens() runs per event."""
        self.enqueued_at = 0.0
        self.first_token_at: float | None = time.time() if resumed else None
        self.last_token_at = 0.0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.admitted = resumed
        self.outcome: str | None = None
        # The trace context goes into req.trace now, before the request is encoded.
        self.span = tracing.RequestSpan(req.id, req.model, req.user, self.tier, None if resumed else req.trace)

    def _emit(self, kind: Kind, ts: float | None = None, **kw) -> None:
        if self.sink is not None:
            self.sink.emit(event(kind, self.req.id, ts, model=self.req.model, **kw))

    def admit(self):
        """Context manager around the enqueue (the ``admit`` span)."""
        return self.span.admit()

    def enqueued(self) -> None:
        self.admitted = True
        self.enqueued_at = self.req.created_at or time.time()
        self._emit(Kind.ENQUEUED, self.enqueued_at, user=self.req.user, tier=self.tier,
                   prompt_tokens=prompt_tokens(self.req), max_tokens=max_tokens(self.req))
        self.m.prompt_tokens.labels(self.req.model).inc(prompt_tokens(self.req))

    def rejected(self, reason: str) -> None:
        if self.outcome is None:
            self._emit(Kind.REJECTED, user=self.req.user, tier=self.tier,
                       prompt_tokens=prompt_tokens(self.req), error=reason)
            self._end("rejected", reason)

    def tokens(self, ev: TokenEvent) -> None:
        now = time.time()
        n = len(ev.token_ids)
        self.completion_tokens += n
        self.cached_tokens = max(self.cached_tokens, ev.cached_tokens)
        if self.resumed:
            return
        if self._token_series is None:
            model = self.req.model
            self._token_series = (self.m.ttft.labels(model), self.m.itl.labels(model),
                                  self.m.generation_tokens.labels(model))
        ttft, itl, generation_tokens = self._token_series
        if self.first_token_at is None:
            self.first_token_at = now
            self._emit(Kind.FIRST_TOKEN, now)
            ttft.observe(max(0.0, now - self.enqueued_at))
        elif n:
            itl.observe((now - self.last_token_at) / n)
        self.last_token_at = now
        generation_tokens.inc(n)

    def finished(self) -> None:
        if self.outcome is None:
            now = time.time()
            self._emit(Kind.FINISHED, now, completion_tokens=self.completion_tokens,
                       cached_tokens=self.cached_tokens)
            if not self.resumed:
                self.m.e2e.labels(self.req.model).observe(max(0.0, now - self.enqueued_at))
            self._end("finished")

    def failed(self, error: str) -> None:
        if self.outcome is None and self.admitted:
            self._emit(Kind.FAILED, completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens,
                       error=error)
            self._end("failed", error)

    def cancelled(self, reason: str = "client_closed") -> None:
        """The client went away (or stopped reading) before the request finished."""
        if self.outcome is None and not self.admitted:  # the enqueue itself failed: nothing ran
            self.outcome = "not_admitted"
            self.span.end("not_admitted")
        elif self.outcome is None:
            self._emit(Kind.CANCELLED, completion_tokens=self.completion_tokens,
                       cached_tokens=self.cached_tokens, error=reason)
            self._end("cancelled", reason)

    def handed_over(self) -> None:
        """The client left and another reader took the stream over (it records the end):
        close this reader's span without a lifecycle event."""
        if self.outcome is None:
            self.outcome = "handed_over"
            self.span.end("handed_over", completion_tokens=self.completion_tokens)

    def _end(self, status: str, error: str = "") -> None:
        self.outcome = status
        self.m.requests.labels(self.req.model, self.tier, status).inc()
        self.span.end(status, error, completion_tokens=self.completion_tokens)


@dataclass(slots=True)
class Claim:
    """The claimer's note of one claimed request, shipped through the publisher's
    queue so that one thread owns the per-request bookkeeping."""

    model: str
    claimed: Claimed
    batch_size: int
    at: float

    @property
    def request(self) -> GenerateRequest:
        return self.claimed.request


@dataclass(slots=True)
class _Live:
    claim: Claim
    tokens: int = 0
    cached: int = 0
    finished: bool = False
    first_token_at: float | None = None
    last_token_at: float = 0.0
    first_publish: tuple[float, float] | None = None
    round_trips: int = 0
    shipped: bool = False
    preempted: tuple[float, str] | None = None
    """(when, why) this claim ended in a preemption."""


class WorkerRecorder:
    """Used by the publisher thread only. Events go into the round trip it sends anyway."""

    def __init__(self, worker_id: str, maxlen: int):
        self.worker_id = worker_id
        self.maxlen = maxlen
        self.m = worker_metrics()
        self._generated: dict[str, object] = {}
        """Per model, the labelled token counter (token() runs per event)."""
        self._live: dict[str, _Live] = {}
        self._released: list[_Live] = []

    def claim(self, pipe, c: Claim) -> None:
        req, cl = c.request, c.claimed
        self._live[req.id] = _Live(c)
        add_to_pipeline(pipe, event(Kind.CLAIMED, req.id, c.at, model=c.model, user=req.user, tier=str(req.tier),
                                    # resumes after a preemption are not attempts (nor count toward MAX_ATTEMPTS)
                                    worker=self.worker_id, attempt=cl.attempt - cl.preemptions,
                                    batch_size=c.batch_size, prompt_tokens=prompt_tokens(req), preemptions=cl.preemptions,
                                    preempted_ms=round(cl.preempted_s * 1000)), self.maxlen)
        self.m.claimed.labels(c.model).inc()
        if req.created_at and cl.attempt == 1:
            self.m.queue_wait.labels(c.model, str(req.tier)).observe(max(0.0, c.at - req.created_at))

    def token(self, model: str, ev: TokenEvent, now: float) -> None:
        counter = self._generated.get(model)
        if counter is None:
            counter = self._generated[model] = self.m.generated_tokens.labels(model)
        counter.inc(len(ev.token_ids))
        live = self._live.get(ev.request_id)
        if live is None:
            return
        live.tokens += len(ev.token_ids)
        live.cached = max(live.cached, ev.cached_tokens)
        live.finished = live.finished or (ev.finish_reason not in (None, "abort"))
        if live.first_token_at is None:
            live.first_token_at = now
        live.last_token_at = now
        live.shipped = True

    def release(self, pipe, model: str, request_id: str, ev: TokenEvent | ErrorEvent | None, now: float) -> None:
        live = self._live.pop(request_id, None)
        if isinstance(ev, ErrorEvent):
            error, outcome = ev.code or ev.type, "failed"
        elif live is not None and not live.finished:
            error, outcome = "aborted", "aborted"
        else:
            error, outcome = "", "finished"
        add_to_pipeline(pipe, event(Kind.RELEASED, request_id, now, model=model, worker=self.worker_id,
                                    completion_tokens=live.tokens if live else 0,
                                    cached_tokens=live.cached if live else 0, error=error), self.maxlen)
        self.m.released.labels(model, outcome).inc()
        if live is not None and tracing.enabled():
            self._released.append(live)

    def requeued(self, pipe, model: str, request_id: str, kind: str, reason: str, now: float) -> None:
        """The request went back to the queue: ``preempted`` (for ``reason``), or
        ``failed`` (this worker's step failed; it resumes elsewhere or here)."""
        live = self._live.pop(request_id, None)
        if kind == "preempted":
            preemptions = (live.claim.claimed.preemptions if live else 0) + 1
            add_to_pipeline(pipe, event(Kind.PREEMPTED, request_id, now, model=model, worker=self.worker_id,
                                        preemptions=preemptions, reason=reason), self.maxlen)
            self.m.preemptions.labels(model, reason).inc()
            if live is not None:
                live.preempted = (now, reason)
        self.m.released.labels(model, "preempted" if kind == "preempted" else "requeued").inc()
        if live is not None and tracing.enabled():
            self._released.append(live)

    def round_trip(self, started: float, ended: float) -> None:
        """After a round trip: note which requests it carried, record finished requests' spans."""
        self.m.publish.observe(ended - started)
        for live in self._live.values():
            self._note(live, started, ended)
        for live in self._released:
            self._note(live, started, ended)
            self._spans(live)
        self._released.clear()

    @staticmethod
    def _note(live: _Live, started: float, ended: float) -> None:
        if live.shipped:
            live.shipped = False
            live.round_trips += 1
            if live.first_publish is None:
                live.first_publish = (started, ended)

    def _spans(self, live: _Live) -> None:
        c, cl = live.claim, live.claim.claimed
        attrs = {"inferstack.worker": self.worker_id, "inferstack.attempt": cl.attempt}
        if cl.preempted_at:  # resumed: it waited since its preemption, not since it was sent
            spans = [("preempted", cl.preempted_at, c.at, {"inferstack.preemptions": cl.preemptions, **attrs})]
        else:
            spans = [("queue_wait", c.request.created_at or c.at, c.at,
                      {"inferstack.batch_size": c.batch_size, **attrs})]
        if live.first_token_at is not None:
            spans.append(("prefill", c.at, live.first_token_at, {"inferstack.cached_tokens": live.cached, **attrs}))
            spans.append(("decode", live.first_token_at, live.last_token_at,
                          {"inferstack.completion_tokens": live.tokens, **attrs}))
        if live.first_publish is not None:
            spans.append(("publish", *live.first_publish, {"inferstack.round_trips": live.round_trips, **attrs}))
        if live.preempted is not None:
            at, reason = live.preempted
            spans.append(("preempt", at, at, {"inferstack.reason": reason, **attrs}))
        tracing.record_spans(c.request.trace, spans)
