"""What a worker's claim hands an engine: the request and how it comes (attempt,
weight, preemption history, rows it may take). Plain data with no Redis behind it,
so an engine runs without the queue (``loadtest/gpu_bench.py`` on a bare GPU host)."""

from __future__ import annotations

from dataclasses import dataclass

from broker.messages import GenerateRequest


@dataclass(frozen=True, slots=True)
class Claimed:
    request: GenerateRequest
    attempt: int
    """1 on the first claim; more after a lease lapsed or a preemption (resume from the output log)."""
    weight: float = 1.0
    """The user's weight under fair queueing (preemption compares shares with it)."""
    preemptions: int = 0
    """Times it was preempted before this claim."""
    preempted_s: float = 0.0
    """Time it spent back in the queue after preemptions, in all."""
    preempted_at: float = 0.0
    """Unix time of its last preemption (0: none): this claim resumes it."""
    victims: tuple[str, ...] = ()
    """Running requests of this worker it takes the rows of (a preempting claim)."""
    reason: str = ""
    """Why it may preempt them: ``tier`` or ``share``."""
