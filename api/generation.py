"""One admitted text request inside the API: enqueue it, read its events in order
(dropping duplicates a resumed request may repeat, refilling gaps from the output
log), enforce its start deadline, and cancel it when the client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from api.errors import OpenAIError
from api.state import AppState
from broker.connection import UNAVAILABLE
from broker.messages import ErrorEvent, GenerateRequest, TokenEvent
from metrics.lifecycle import RequestRecorder

log = logging.getLogger(__name__)

REFUSALS = {
    "queue_full": "The queue for `{model}` is full ({detail} waiting at your tier); retry after {retry} s.",
    "user_cap": "You have too many requests waiting for `{model}` (limit {detail}); retry after {retry} s.",
    "wait_exceeds_deadline": "The estimated wait for `{model}` ({detail} s) exceeds this request's deadline; "
                             "retry after {retry} s or allow a longer deadline_s.",
}


class Generation:
    GONE_GRACE_S = 2.0
    """How long a request the queue no longer knows, past its deadline and with nothing
    logged, may still send its error event before the API ends it itself."""

    def __init__(self, state: AppState, req: GenerateRequest, *, weight: float = 1.0,
                 deadline_s: float | None = None, user_cap: int | None = None):
        self.state = state
        self.req = req
        self.weight = weight
        self.deadline_s = deadline_s or state.sched.default_deadline_s
        self.user_cap = user_cap
        self.enqueued_at = 0.0
        self.first_event_at: float | None = None
        self._queue: asyncio.Queue | None = None
        self._next: dict[int, int] = {}
        self._finished: set[int] = set()
        self._closed = False
        self._gone_since: float | None = None
        self.rec = RequestRecorder(state.events, req)  # lifecycle events, Prometheus, trace span

    @property
    def done(self) -> bool:
        return len(self._finished) >= self.req.params.n

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

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Token events in order, each exactly once, until every choice has finished."""
        assert self._queue is not None
        stall = self.state.sched.lease_s * self.state.sched.max_attempts + 30
        while not self.done:
            if self.first_event_at is None:
                timeout = max(0.05, self.deadline_s + 1.0 - (time.monotonic() - self.enqueued_at))
            else:
                timeout = stall
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                if self.first_event_at is None:
                    await self._deadline_passed()
                    continue
                self.rec.failed("stalled")
                raise OpenAIError(504, "The worker stopped sending tokens for this request.",
                                  type="server_error", code="stalled") from None
            if item is None:  # relay reconnected: whatever was missed is in the log
                try:
                    logged = await self._from_log(0)
                except UNAVAILABLE:  # failing over: look again shortly
                    asyncio.get_running_loop().call_later(0.5, self._queue.put_nowait, None)
                    continue
                for ev in logged:
                    for out in self._accept(ev):
                        yield out
                continue
            if isinstance(item, ErrorEvent):
                self.rec.failed(item.code or item.type)
                raise OpenAIError(item.status, item.message, type=item.type, code=item.code)
            for out in self._accept(item):
                yield out

    def _accept(self, ev: TokenEvent) -> list[TokenEvent]:
        expected = self._next.get(ev.choice, 0)
        if ev.choice in self._finished or ev.start + len(ev.token_ids) <= expected and ev.token_ids:
            return []  # a resumed worker repeating what we already have
        if ev.start > expected:
            # Missed events (a dropped subscription): schedule a refill from the log.
            self._queue.put_nowait(None)
            return []
        if self.first_event_at is None:
            self.first_event_at = time.monotonic()
        self._next[ev.choice] = ev.start + len(ev.token_ids)
        self.rec.tokens(ev)
        if ev.finish_reason:
            self._finished.add(ev.choice)
            if self.done:
                self.rec.finished()
        return [ev]

    async def _from_log(self, since: int) -> list[TokenEvent]:
        return await self.state.queue.output_log(self.req.model, self.req.id, since)

    async def _deadline_passed(self) -> None:
        try:
            result = await self.state.queue.cancel(self.req.model, self.req.id)
            never_logged = result == "gone" and not await self._from_log(0)
        except UNAVAILABLE:  # failing over: ask again shortly (it may have started meanwhile)
            await asyncio.sleep(0.2)
            return
        if result == "dequeued":
            raise self._not_started()
        if never_logged:
            # The queue no longer knows it and it never produced a token: its error event
            # (deadline passed at claim, out of attempts) is on its way, or the request
            # was lost with a primary that failed over before replicating it. Give the
            # former a moment; then say so rather than wait for what will not come.
            now = time.monotonic()
            self._gone_since = self._gone_since or now
            if now - self._gone_since < self.GONE_GRACE_S:
                await asyncio.sleep(0.2)
                return
            raise self._not_started()
        # running: it started just now; gone: it finished or a worker reported it. Keep reading.
        self.first_event_at = self.first_event_at or time.monotonic()

    def _not_started(self) -> OpenAIError:
        self.rec.failed("deadline_exceeded")
        return OpenAIError(503, f"Request not started within its deadline of {self.deadline_s:g} s; "
                           "the model is overloaded. Retry later.", type="server_error",
                           code="deadline_exceeded", headers={"Retry-After": "1"})

    async def cancel(self) -> None:
        """The client went away: dequeue it, or stop it at its worker's next step."""
        if self.done:
            return
        self.rec.cancelled()
        try:
            await self.state.queue.cancel(self.req.model, self.req.id)  # a running one: its worker is told
        except Exception:  # noqa: BLE001 - best effort; the lease reaper covers the rest
            log.exception("cancel of %s failed", self.req.id)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.state.relay.unregister(self.req.id)
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
