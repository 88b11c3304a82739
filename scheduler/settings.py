from __future__ import annotations

from pydantic import Field

from inferstack.settings import CommonSettings


class SchedulerSettings(CommonSettings):
    """Queue policy, read by the API (admission) and the workers (claim, leases)."""

    fairness: bool = Field(True, description="Weighted fair queueing across users (off = FIFO, a benchmark baseline).")
    max_queue: int = Field(1000, description="Most requests waiting per model; beyond it, 429.")
    max_queue_per_user: int = Field(200, description="Most requests one user may have waiting per model.")
    tier_share_normal: float = Field(0.85, description="Share of max_queue open to the normal tier.")
    tier_share_low: float = Field(0.6, description="Share of max_queue open to the low tier (shed first).")
    aging_max_wait_s: float = Field(
        30.0, description="A lower-tier request waiting this long is overdue; overdue requests take every other claim."
    )
    default_deadline_s: float = Field(120.0, description="A request not started within this fails (clients may ask for less).")
    lease_s: float = Field(
        10.0, description="In-flight lease; heartbeats extend it, the reaper requeues it when it lapses (the backstop "
                          "for a worker that lives but no longer renews a request).")
    worker_dead_s: float = Field(
        1.5, description="A worker not heard from (claim or lease renewal) for this long is dead: the reaper requeues "
                         "its requests at once instead of waiting for their leases (0 = leases only). Keep it a few "
                         "worker heartbeats (INFERSTACK_HEARTBEAT_S).")
    max_attempts: int = Field(3, description="Claims per request before it fails instead of being requeued.")
    affinity_window_s: float = Field(
        1.0, description="How long a request is offered only to the worker holding its KV cache (0 = off)."
    )
    output_log_ttl_s: int = Field(
        60, description="How long a finished request's token log is kept: the window in which a client may still "
                        "resume its stream (GET /v1/chat/completions/{id}/stream).")
    preemption: bool = Field(
        True, description="A full batch makes room for a waiting request of a higher tier, or of a user under its "
        "fair share, by preempting a running one (off = wait for a free row, a benchmark baseline).")
    preempt_min_run_steps: int = Field(
        4, ge=0, description="Engine steps a request runs after it is admitted or resumed before it may be "
        "preempted (the thrash guard); a qualifying newcomer starts within this plus 2 steps.")

    def tier_share(self, tier: str) -> float:
        return {"high": 1.0, "normal": self.tier_share_normal, "low": self.tier_share_low}[tier]
