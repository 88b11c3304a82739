"""One admitted text request inside the API: enqueue it, read its events in order
(dropping duplicates a resumed request may repeat, refilling gaps from the output
log), enforce its start deadline, ride out a Redis outage, and cancel it when the
client goes away.

Events reach a reader through the process's relay (live) and, after anything that
may have dropped some, from the request's output log (``is:{m}:out:<id>``), which
holds every event a worker published. A reader that is not in the process the
workers publish to (a client resumed its stream on another API replica) follows the
log alone. Whatever arrives twice is dropped by offset; whatever arrives early waits
for the gap before it to fill. When the request's state is gone (a Redis that came
back without it) the reader fails with ``request_lost`` instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from api.errors import OpenAIError
from api.state import AppState
from broker import keys, messages
from broker.connection import UNAVAILABLE, backoff
from broker.messages import ErrorEvent, GenerateRequest, TokenEvent
from metrics.lifecycle import RequestRecorder

log = logging.getLogger(__name__)

REFUSALS = {
    "queue_full": "The queue for `{model}` is full ({detail} waiting at your tier); retry after {retry} s.",
    "user_cap": "You have too many requests waiting for `{model}` (limit {detail}); retry after {retry} s.",
    "wait_exceeds_deadline": "The estimated wait for `{model}` ({detail} s) exceeds this request's deadline; "
                             "retry after {retry} s or allow a longer deadline_s.",
}

POLL_S = 0.2
"""How often the log is read while it is the source (a reader on another replica, a
gap waiting to fill, a request that seems gone, Redis away)."""
LOST_AFTER_S = 1.0
"""A request must look gone (no state, no end in its log) this long before its reader
gives up: the scheduler deletes a request a moment before its final error is logged."""


def redis_unavailable(outage_s: float) -> OpenAIError:
    return OpenAIError(503, f"Redis has been unavailable for more than {outage_s:g} s; this request's state "
                       "cannot be reached. Retry later.", type="server_error", code="redis_unavailable",
                       headers={"Retry-After": "5"})


class Generation:
    def __init__(self, state: AppState, req: GenerateRequest, *, weight: float = 1.0,
                 deadline_s: float | None = None, user_cap: int | None = None, resumed: bool = False):
        self.state = state
        self.req = req
        self.weight = weight
        self.deadline_s = deadline_s or state.sched.default_deadline_s
        self.user_cap = user_cap
        self.resumed = resumed
        """A reader of a request someone else admitted (a resumed stream): it starts from the log."""
        self.follow = resumed and req.reply_to != state.relay.channel
        """Its events are published to another API process: read them from the log."""
        self.enqueued_at = 0.0
        self.first_event_at: float | None = None
        self.detached = False
        """The client left early but its request goes on (a resumable stream's grace period)."""
        self._queue: asyncio.Queue | None = None
        self._next: dict[int, int] = {}
        self._ahead: dict[int, dict[int, TokenEvent]] = {}
        self._finished: set[int] = set()
        self._closed = False
        self._log_read = 0          # log entries already read
        self._checked_at = 0.0      # last log read (monotonic)
        self._gap_since: float | None = None
        self._gone_since: float | None = None
        self._down_since: float | None = None
        self._down_failures = 0
        self._progress_at = 0.0
        self.rec = RequestRecorder(state.events, req, resumed=resumed)  # lifecycle events, Prometheus, trace span
        self._queued_again_at: float | None = None

    @property
    def done(self) -> bool:
        return len(self._finished) >= self.req.params.n

    @property
    def progress(self) -> dict[int, int]:
        """Tokens relayed so far, per choice."""
        return self._next

    async def admit(self) -> None:
        """Enqueue, or raise 429 with Retry-After. Subscribed before enqueueing: the
        process-wide relay listens already, the per-request queue exists first."""
        self._queue = self.state.relay.register(self.req.id)
        self.enqueued_at = time.monotonic()
        try:
            with self.rec.admit():
                adm = await self.state.queue.enqueue(self.req, weight=self.weight, timeout_s=self.deadline_s,
                                                     user_cap=self.user_cap)
        except BaseException:
            self.close()
            raise
        if not adm.admitted:
            self.rec.rejected(adm.reason)
            self.close()
            msg = REFUSALS[adm.reason].format(model=self.req.model, detail=adm.detail, retry=adm.retry_after_s)
            raise OpenAIError(429, msg, type="rate_limit_error", code=adm.reason,
                              headers={"Retry-After": str(adm.retry_after_s)})
        self.rec.enqueued()

    def attach(self) -> None:
        """Read a request someone else admitted (a resumed stream): live events when they
        come to this process, the log in any case."""
        self._queue = asyncio.Queue() if self.follow else self.state.relay.register(self.req.id)
        self.enqueued_at = time.monotonic()
        self.first_event_at = self.enqueued_at  # its start deadline is its first reader's business

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events in order, each exactly once, until every choice has finished."""
        assert self._queue is not None
        self._progress_at = time.monotonic()
        check = self.resumed  # a resumed reader starts from the log
        while not self.done:
            if check or self._log_due():
                check = False
                try:
                    logged, exists = await self._read_log()
                except UNAVAILABLE:
                    self._unavailable()
                    continue
                for ev in logged:
                    for out in self._take(ev):
                        yield out
                self._note_state(exists)
                continue
            try:
                if self._queue.empty():
                    # asyncio.timeout, not wait_for: wait_for wraps the get in a new Task (3.11)
                    async with asyncio.timeout(self._wait_s()):
                        item = await self._queue.get()
                else:
                    item = self._queue.get_nowait()
            except TimeoutError:
                await self._timed_out()
                continue
            if item is None:  # the relay lost (or regained) its subscription: the log has what it missed
                check = True
                self._progress_at = time.monotonic()
                continue
            for out in self._take(item):
                yield out

    # -- what arrives ----------------------------------------------------------------

    def _take(self, item) -> list[TokenEvent]:
        if isinstance(item, ErrorEvent):
            self.rec.failed(item.code or item.type)
            raise OpenAIError(item.status, item.message, type=item.type, code=item.code)
        out = self._accept(item)
        if out:
            self._queued_again_at = None
            self._progress_at = time.monotonic()
            self.first_event_at = self.first_event_at or self._progress_at
        return out

    def _accept(self, ev: TokenEvent) -> list[TokenEvent]:
        out: list[TokenEvent] = []
        todo = [ev]
        while todo:
            ev = todo.pop()
            c = ev.choice
            expected = self._next.get(c, 0)
            if c in self._finished or ev.start + len(ev.token_ids) <= expected and ev.token_ids:
                continue  # a resumed worker (or the log) repeating what we already have
            if ev.start > expected:
                # Early: events before it were missed (a dropped subscription); they are in
                # the log, or about to be. It waits for them.
                self._ahead.setdefault(c, {})[ev.start] = ev
                self._gap_since = self._gap_since or time.monotonic()
                continue
            self._next[c] = ev.start + len(ev.token_ids)
            self.rec.tokens(ev)
            out.append(ev)
            if ev.finish_reason:
                self._finished.add(c)
                if self.done:
                    self.rec.finished()
            ahead = self._ahead.get(c)
            if ahead:
                todo += [ahead.pop(s) for s in sorted(ahead, reverse=True) if s <= self._next[c]]
                if not ahead:
                    del self._ahead[c]
        if not self._ahead:
            self._gap_since = None
        return out

    # -- the log and the request's state -------------------------------------------------

    async def _read_log(self) -> tuple[list, bool]:
        """What the log holds beyond what was read, and whether the request is still
        queued or running, read together."""
        self._checked_at = time.monotonic()
        pipe = self.state.redis.pipeline(transaction=True)
        pipe.exists(keys.request(self.req.model, self.req.id))
        pipe.llen(keys.output_log(self.req.model, self.req.id))
        pipe.lrange(keys.output_log(self.req.model, self.req.id), self._log_read, -1)
        exists, length, raw = await pipe.execute()
        if length < self._log_read:  # a restarted Redis lost its tail: read it all again
            self._log_read = 0
            return await self._read_log()
        self._log_read += len(raw)
        self._down_since, self._down_failures = None, 0
        return [messages.decode(x) for x in raw], bool(exists)

    def _note_state(self, exists: bool) -> None:
        if self.done or exists:
            self._gone_since = None
            return
        now = time.monotonic()
        self._gone_since = self._gone_since or now
        if now - self._gone_since >= LOST_AFTER_S:
            self.rec.failed("request_lost")
            raise OpenAIError(503, "This request's state is gone (Redis restarted without it) and it cannot go on. "
                              "Retry the request.", type="server_error", code="request_lost",
                              headers={"Retry-After": "1"})

    def _log_due(self) -> bool:
        polling = self.follow or self._gap_since is not None or self._gone_since is not None
        if self._down_since is not None:
            return time.monotonic() - self._checked_at >= backoff().compute(self._down_failures)
        return polling and time.monotonic() - self._checked_at >= POLL_S

    def _unavailable(self) -> None:
        """A log read failed: Redis is away. Retry with backoff until the outage limit."""
        self._down_since = self._down_since or time.monotonic()
        self._down_failures += 1
        if time.monotonic() - self._down_since > self.state.settings.redis_outage_s:
            self.rec.failed("redis_unavailable")
            raise redis_unavailable(self.state.settings.redis_outage_s)

    # -- waiting -------------------------------------------------------------------------

    @property
    def _stall_s(self) -> float:
        return self.state.sched.lease_s * self.state.sched.max_attempts + 30

    def _outage_s(self) -> float:
        own = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        relay = 0.0 if self.follow else self.state.relay.outage.elapsed()
        return max(own, relay)

    def _wait_s(self) -> float:
        now = time.monotonic()
        if self.follow or self._gap_since is not None or self._gone_since is not None or self._outage_s():
            return POLL_S
        if self.first_event_at is None:
            return max(0.05, self.deadline_s + 1.0 - (now - self.enqueued_at))
        return max(0.05, self._stall_s - (now - self._progress_at))

    async def _timed_out(self) -> None:
        now = time.monotonic()
        outage = self._outage_s()
        if outage:
            if outage > self.state.settings.redis_outage_s:
                self.rec.failed("redis_unavailable")
                raise redis_unavailable(self.state.settings.redis_outage_s)
            self._progress_at = now  # the stall clock starts again when Redis is back
            return
        if self.first_event_at is None:
            if now - self.enqueued_at >= self.deadline_s + 1.0:
                try:
                    await self._deadline_passed()
                except UNAVAILABLE:
                    self._unavailable()
            return
        if now - self._progress_at >= self._stall_s:
            try:
                if await self._waiting_again():
                    self._progress_at = now  # look again after another stall period
                    return
            except UNAVAILABLE:
                self._unavailable()
                return
            self.rec.failed("stalled")
            raise OpenAIError(504, "The worker stopped sending tokens for this request.", type="server_error",
                              code="stalled")

    async def _waiting_again(self) -> bool:
        """No token for a while because the request went back to the queue (preempted, its
        worker drained for a mode switch, or its tensor-parallel group broke): it waits
        for a worker like a new request, up to its deadline again, resuming from its log."""
        if await self.state.queue.state(self.req.model, self.req.id) != "queued":
            return False
        now = time.monotonic()
        self._queued_again_at = self._queued_again_at or now
        return now - self._queued_again_at < self.deadline_s

    async def _deadline_passed(self) -> None:
        result = await self.state.queue.cancel(self.req.model, self.req.id)
        if result == "dequeued":
            self.rec.failed("deadline_exceeded")
            raise OpenAIError(503, f"Request not started within its deadline of {self.deadline_s:g} s; "
                              "the model is overloaded. Retry later.", type="server_error",
                              code="deadline_exceeded", headers={"Retry-After": "1"})
        # running: it started just now; gone: it finished or a worker reported it. Keep reading.
        self.first_event_at = self.first_event_at or time.monotonic()

    # -- the end ---------------------------------------------------------------------------

    async def cancel(self) -> str:
        """The client went away: dequeue it, or stop it at its worker's next step.
        Returns what the queue said (``dequeued``, ``running``, ``gone``), or ``done``."""
        if self.done:
            return "done"
        self.rec.cancelled()
        try:
            result = await self.state.queue.cancel(self.req.model, self.req.id)
            if result == "running":
                await self.state.redis.publish(keys.CANCEL_CHANNEL, self.req.id)
            return result
        except Exception:  # noqa: BLE001 - best effort; the lease reaper covers the rest
            log.exception("cancel of %s failed", self.req.id)
            return "failed"

    async def abandon(self) -> None:
        """Nobody resumed the stream within the grace period: cancel the request, or, if
        it ended meanwhile, record how (its log says)."""
        if self.done:
            return
        try:
            result = await self.state.queue.cancel(self.req.model, self.req.id)
            if result == "running":
                await self.state.redis.publish(keys.CANCEL_CHANNEL, self.req.id)
            if result == "gone":
                logged, _ = await self._read_log()
                for ev in logged:
                    self._take(ev)
        except OpenAIError:
            return  # it failed: recorded
        except Exception:  # noqa: BLE001 - best effort, as for an immediate cancel
            log.exception("cancel of %s failed", self.req.id)
        self.rec.cancelled()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._queue is not None and not self.follow:
                self.state.relay.unregister(self.req.id, self._queue)
            if not self.detached:
                self.rec.cancelled()  # the client is gone; a no-op unless admitted and not yet ended


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of several generations (a multi-prompt completion), as they come."""
    if len(gens) == 1:
        async for ev in gens[0].events():
            yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation):
        try:
            async for ev in gen.events():
                await q.put((i, ev, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the reader
            await q.put((i, None, exc))
        finally:
            await q.put((i, None, StopAsyncIteration()))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(gens)
    try:
        while remaining:
            i, ev, exc = await q.get()
            if isinstance(exc, StopAsyncIteration):
                remaining -= 1
            elif exc is not None:
                raise exc
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def watch_disconnect(request, gens: list[Generation]) -> None:
    """For non-streaming requests: cancel the work when the client hangs up."""
    while True:
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            for g in gens:
                await g.cancel()
            return
