"""The interface every modality's engine implements, and what engines hand back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from broker.messages import ErrorEvent, TokenEvent
from scheduler.claimed import Claimed


@dataclass(slots=True)
class Outgoing:
    """One event for one request, with where it goes."""

    model: str
    reply_to: str
    request_id: str
    event: TokenEvent | ErrorEvent | None
    request_done: bool = False
    """All choices of the request are finished: release its lease."""
    index_ops: list[tuple[str, str, str, int]] | None = None
    """KV-index changes (op, kind, key, tokens) to write before the events go out."""
    owned: bool = True
    """Sent as the request's lease owner (the event is dropped if this worker lost it).
    False for errors about requests the scheduler itself already ended (deadline passed
    before the start, out of attempts): nobody owns those any more."""
    requeue: str | None = None
    """Hand the request back to the queue instead of releasing it (``lua/requeue.lua``),
    after its events: ``preempted`` (its rows went to another request; not a failed
    attempt), ``drained`` (its worker stopped; not a failed attempt either) or ``failed`` (the engine step failed; ``event``, an ErrorEvent, reaches
    the client only once the request is out of attempts)."""
    reason: str = ""
    """Why it was preempted: ``tier`` or ``share``."""


Emit = Callable[[list[Outgoing]], None]


class FatalEngineError(RuntimeError):
    """An engine step failed in a way the engine cannot recover from in this process
    (a tensor-parallel peer died or hung): the worker hands every request it holds back
    to the queue and exits, and its supervisor starts it again."""


def handed_back(model: str, requests: list, message: str, kind: str = "failed") -> list[Outgoing]:
    """What an engine emits for the requests it held when its step failed (``kind``
    ``failed``: each goes back to the queue, or fails with ``message`` once it is out of
    attempts) or when its worker stops with them unfinished (``drained``)."""
    return [Outgoing(model, r.reply_to, r.id, ErrorEvent(
        r.id, f"the worker failed while serving it: {message}", type="server_error", code="engine_error",
        status=500), requeue=kind) for r in requests]


class Engine(Protocol):
    model: str

    def capacity(self) -> int:
        """How many more sequences (batch rows; a request with ``n`` choices takes n)
        this engine can take now: the claim stops when the claimed requests bring that many."""

    def add(self, claimed: Claimed, log: list[TokenEvent]) -> None:
        """Take a claimed request; ``log`` holds events already published for it by
        a worker that died, to resume from."""

    def abort(self, request_id: str) -> None:
        """Drop a request at the next step (client gone, lease lost)."""

    def has_work(self) -> bool: ...

    def step(self, emit: Emit) -> None:
        """Advance every admitted request by one step and emit what it produced."""

    def request_ids(self) -> list[str]:
        """Requests this engine holds (their leases are extended by the heartbeat)."""

    def requeue_all(self, message: str, emit: Emit, kind: str = "failed") -> None:
        """A step raised (out of memory, a device error): start clean, handing every
        held request back to the queue (``Outgoing.requeue = "failed"``, with an
        ErrorEvent saying ``message`` for when it is out of attempts). The worker also
        calls it with ``kind="drained"`` when it stops with requests unfinished."""

    def gauges(self) -> dict[str, float]:
        """For /metrics, read from another thread: ``batch_size`` (sequences running)
        and ``kv_cache_bytes``."""


@dataclass(slots=True)
class MediaFile:
    """One output file of a media job (a PNG, an MP4)."""

    data: bytes
    media_type: str


OnStep = Callable[[int, int], bool]
"""``on_step(step, steps)`` after each denoising step; returns False to stop the batch
(every job in it was cancelled or timed out)."""


class JobEngine(Protocol):
    """Image and video models: a batch of jobs runs as one pipeline call (a whole
    denoising loop), driven by the job consumer (``gpu_worker.media.jobs``) rather than
    stepped by the compute loop, and results are files rather than streamed events."""

    model: str
    max_batch: int

    def batch_key(self, request) -> tuple:
        """Jobs with equal keys can share one pipeline call (same size, steps, ...)."""

    def run(self, requests: list, on_step: OnStep) -> list[list[MediaFile]]:
        """Generate every request of the batch; per request, its files."""
