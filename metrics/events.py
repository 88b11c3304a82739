"""Request lifecycle events: what API processes and workers append to the
``is:events`` stream, one entry per step, for the exporter to turn into rows.

Who emits what:

* API: ``enqueued`` or ``rejected`` (admission), ``first_token``, then one of
  ``finished`` / ``failed`` / ``cancelled`` (what the client saw).
* worker: ``claimed`` (per claim: worker, attempt, batch size at start, preemptions
  so far and the time they cost), ``preempted`` (its rows went to another request:
  the count, the reason) and ``released`` (its lease released: tokens it generated,
  KV tokens reused, an error code, ``aborted`` when it dropped the request).

Events are flat string maps (readable with ``XRANGE is:events - +``); fields at their
default value are left out. Emitting never makes a request wait: the API queues
events for one writer task (:class:`EventSink`), the worker's publisher thread adds
them to the pipeline it sends anyway (:func:`add_to_pipeline`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

from broker import keys
from broker.connection import UNAVAILABLE, Outage

log = logging.getLogger(__name__)


class Kind(StrEnum):
    ENQUEUED = "enqueued"
    REJECTED = "rejected"
    CLAIMED = "claimed"
    FIRST_TOKEN = "first_token"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RELEASED = "released"
    PREEMPTED = "preempted"


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    kind: Kind
    request_id: str
    ts: float
    """Unix time of the step, on the emitting host's clock."""
    model: str = ""
    user: str = ""
    tier: str = ""
    worker: str = ""
    attempt: int = 0
    prompt_tokens: int = 0
    max_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from a reused KV cache instead of prefilled."""
    batch_size: int = 0
    """Requests the worker held when this one started (claimed)."""
    preemptions: int = 0
    """Times it has been preempted (claimed: before this claim; preempted: with this one)."""
    preempted_ms: int = 0
    """Milliseconds it spent back in the queue after preemptions (claimed: so far)."""
    reason: str = ""
    """Why it was preempted: ``tier`` or ``share``."""
    error: str = ""

    def fields(self) -> dict[str, str]:
        out = {"kind": str(self.kind), "request_id": self.request_id, "ts": repr(self.ts)}
        for f in _OPTIONAL:
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = str(value)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "LifecycleEvent":
        """Parse a stream entry; unknown fields (from a newer emitter) are ignored."""
        kw: dict = {"kind": Kind(fields["kind"]), "request_id": fields["request_id"], "ts": float(fields["ts"])}
        for f in _OPTIONAL:
            if f.name in fields:
                kw[f.name] = int(fields[f.name]) if f.type == "int" else fields[f.name]
        return cls(**kw)


_OPTIONAL = [f for f in dataclasses.fields(LifecycleEvent) if f.name not in ("kind", "request_id", "ts")]


def event(kind: Kind, request_id: str, ts: float | None = None, **kw) -> LifecycleEvent:
    return LifecycleEvent(kind, request_id, time.time() if ts is None else ts, **kw)


def add_to_pipeline(pipe, ev: LifecycleEvent, maxlen: int) -> None:
    """Append ``ev`` as part of a pipeline the caller executes (worker: the publisher's)."""
    pipe.xadd(keys.EVENTS, ev.fields(), maxlen=maxlen, approximate=True)


class EventSink:
    """An asyncio process's writer: ``emit()`` never blocks or fails the request; one
    task appends whatever has queued up in one pipelined round trip. While Redis is
    unreachable the events wait (up to ``max_buffered``; the oldest go first beyond
    it), so an outage does not turn into rows without their ends."""

    def __init__(self, redis, maxlen: int, max_buffered: int = 100_000):
        self.r = redis
        self.maxlen = maxlen
        self.max_buffered = max_buffered
        self._q: asyncio.Queue[LifecycleEvent | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._outage = Outage("lifecycle events", log)
        self.written = 0
        self.dropped = 0

    def emit(self, ev: LifecycleEvent) -> None:
        self._q.put_nowait(ev)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-sink")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is still queued, then stop."""
        if self._task is None:
            return
        self._q.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, timeout_s)
        except TimeoutError:
            log.warning("event sink did not finish writing within %.0f s", timeout_s)
        self._task = None

    async def _run(self) -> None:
        held: list[LifecycleEvent] = []
        stop = False
        while not (stop and not held):
            if not held:
                held.append(await self._q.get())
            while not self._q.empty():
                held.append(self._q.get_nowait())
            stop = stop or None in held
            held = [ev for ev in held if ev is not None]
            if len(held) > self.max_buffered:
                self._drop(len(held) - self.max_buffered, "more than the buffer holds")
                held = held[-self.max_buffered:]
            if not held:
                continue
            if await self._write(held):
                held = []
            elif stop:  # stopping while Redis is away: what is held is lost
                self._drop(len(held), "Redis unavailable at shutdown")
                return

    async def _write(self, batch: list[LifecycleEvent]) -> bool:
        try:
            pipe = self.r.pipeline(transaction=False)
            for ev in batch:
                add_to_pipeline(pipe, ev, self.maxlen)
            await pipe.execute()
        except UNAVAILABLE as exc:
            await asyncio.sleep(self._outage.failed(exc))
            return False
        except Exception:  # noqa: BLE001 - metrics are best effort; requests go on
            log.exception("lifecycle events refused")
            self._drop(len(batch), "Redis refused them")
            return True
        self._outage.ok()
        self.written += len(batch)
        return True

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        log.warning("dropped %d lifecycle events: %s (%d dropped so far)", n, why, self.dropped)
