"""What the API and the workers call: admit, claim (also to preempt), extend, complete,
requeue, reap, cancel.

Each operation is one Lua script (``lua/``), so every state change is atomic and
every key it touches shares the model's hash tag. ``FairQueue`` wraps a sync client
(workers, tools, tests); ``AsyncFairQueue`` an asyncio client (the API).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import orjson

from broker import keys, messages
from broker.messages import GenerateRequest, Tier, TokenEvent
from scheduler.claimed import Claimed
from scheduler.policy import Batch
from scheduler.settings import SchedulerSettings


def _script(name: str) -> str:
    lua = resources.files("scheduler") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / name).read_text()


SCRIPTS = {name: _script(f"{name}.lua")
           for name in ("enqueue", "claim", "claim_preempting", "cancel", "extend", "complete", "requeue", "reap",
                        "kv_index", "emit")}


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    reason: str = ""
    """``queue_full``, ``user_cap`` or ``wait_exceeds_deadline`` when refused."""
    retry_after_s: int = 0
    detail: str = ""
    queued: int = 0


def _claimed(entry) -> Claimed:
    rid, payload, attempts, weight, preemptions, preempted_ms, preempted_at, *rest = entry
    return Claimed(messages.decode(payload), int(attempts), float(weight), int(preemptions),
                   int(preempted_ms) / 1000, float(preempted_at), tuple(rest[1:]), rest[0] if rest else "")


@dataclass(frozen=True, slots=True)
class ClaimResult:
    claimed: list[Claimed]
    expired: list[GenerateRequest]
    """Deadline passed before they started: the caller reports them, never runs them."""


def depths(client, models: list[str]) -> dict[str, dict[str, int]]:
    """Requests waiting per model and tier, for several models in one round trip
    (a sync client). The counters are kept by ``lua/common.lua``."""
    tiers = [t.value for t in Tier]
    pipe = client.pipeline(transaction=False)
    for model in models:
        pipe.hmget(keys.tier_state(model), [f"len:{t}" for t in tiers])
    return {model: {t: int(n or 0) for t, n in zip(tiers, lens)} for model, lens in zip(models, pipe.execute())}


def _now_arg(now: float | None) -> str:
    return "" if now is None else repr(now)


def _enqueue_args(req: GenerateRequest, s: SchedulerSettings, weight: float, timeout_s: float | None,
                  user_cap: int | None, now: float | None):
    return [
        keys.tag(req.model), req.id, messages.encode(req), req.user, str(req.tier), req.cost, weight,
        s.default_deadline_s if timeout_s is None else timeout_s, s.max_queue, s.tier_share(req.tier),
        s.max_queue_per_user if user_cap is None else user_cap, _now_arg(now), "1" if s.fairness else "0",
        req.session_key or "", orjson.dumps(req.prefix_hashes), s.affinity_window_s, req.seqs,
    ]


def _admission(res) -> Admission:
    if res[0] == "ok":
        return Admission(True, queued=int(res[1]))
    return Admission(False, reason=res[0], retry_after_s=int(res[1]), detail=str(res[2]))


class FairQueue:
    """Synchronous face of the queue (workers, tests, tools)."""

    def __init__(self, client, settings: SchedulerSettings):
        self.r = client
        self.s = settings
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}

    def enqueue(self, req: GenerateRequest, *, weight: float = 1.0, timeout_s: float | None = None,
                user_cap: int | None = None, now: float | None = None) -> Admission:
        """Admit ``req`` (it must start within ``timeout_s``) or say why not."""
        return _admission(self._scripts["enqueue"](args=_enqueue_args(req, self.s, weight, timeout_s, user_cap, now)))

    def claim_batch(self, model: str, worker_id: str, n: int, *, now: float | None = None) -> ClaimResult:
        """Atomically take requests for ``model`` in policy order, leased to ``worker_id``,
        until they bring ``n`` sequences (an engine's free rows; see lua/claim.lua)."""
        if n <= 0:
            return ClaimResult([], [])
        claimed, expired = self._scripts["claim"](
            args=[keys.tag(model), worker_id, n, self.s.lease_s, self.s.aging_max_wait_s, _now_arg(now)]
        )
        return ClaimResult([_claimed(c) for c in claimed], [messages.decode(p) for p in expired])

    def claim_preempting(self, model: str, worker_id: str, batch: Batch, *, now: float | None = None) -> ClaimResult:
        """The worker's batch is full: atomically take the waiting requests that may
        preempt part of it (``scheduler.policy``), each with its victims."""
        claimed, expired = self._scripts["claim_preempting"](
            args=[keys.tag(model), worker_id, self.s.lease_s, orjson.dumps(batch.to_json()),
                  self.s.preempt_min_run_steps, _now_arg(now)]
        )
        return ClaimResult([_claimed(c) for c in claimed], [messages.decode(p) for p in expired])

    def requeue(self, model: str, worker_id: str, request_id: str, kind: str, *, client=None,
                now: float | None = None) -> str:
        """Hand a running request back to the head of its user's queue (``kind``:
        ``preempted``, ``drained`` or ``failed``); see lua/requeue.lua for the answers."""
        return self._scripts["requeue"](args=[keys.tag(model), worker_id, request_id, kind, self.s.max_attempts,
                                              _now_arg(now)], client=client)

    def extend_leases(self, model: str, worker_id: str, request_ids: list[str], *, now: float | None = None) -> list[str]:
        """Renew this worker's leases; returns ids it must drop (cancelled or taken over)."""
        if not request_ids:
            return []
        return list(self._scripts["extend"](args=[keys.tag(model), worker_id, self.s.lease_s, _now_arg(now), *request_ids]))

    def complete(self, model: str, worker_id: str, request_id: str) -> bool:
        return bool(self._scripts["complete"](args=[keys.tag(model), worker_id, request_id, self.s.output_log_ttl_s]))

    def reap(self, model: str, *, now: float | None = None) -> tuple[list[str], list[GenerateRequest]]:
        """Requeue the requests of dead workers (silent for ``worker_dead_s``) and lapsed
        leases; returns (requeued ids, requests out of attempts)."""
        requeued, failed = self._scripts["reap"](
            args=[keys.tag(model), self.s.max_attempts, _now_arg(now), self.s.worker_dead_s])
        return list(requeued), [messages.decode(failed[i + 1]) for i in range(0, len(failed), 2)]

    def cancel(self, model: str, request_id: str) -> str:
        return self._scripts["cancel"](args=[keys.tag(model), request_id])

    def kv_index(self, model: str, worker_id: str, ops: list[tuple[str, str, str, int]], ttl_s: float, *,
                 client=None, now: float | None = None) -> None:
        """Apply KV-index ops ``(op, kind, key, tokens)`` for this worker (see lua/kv_index.lua)."""
        if ops:
            args = [keys.tag(model), worker_id, ttl_s, _now_arg(now)] + [x for op in ops for x in op]
            self._scripts["kv_index"](args=args, client=client)

    def depth(self, model: str) -> dict[str, int]:
        return depths(self.r, [model])[model]

    def emit(self, model: str, worker_id: str, channel: str, events: list[tuple[str, str, bytes]], *,
             client=None):
        """Append ``(request id, mode, encoded event)`` to the output logs and publish
        them on ``channel``, fenced by lease owner (``lua/emit.lua``); returns the ids
        this worker no longer owns (their events were dropped)."""
        args = [keys.tag(model), worker_id, channel, self.s.output_log_ttl_s]
        for rid, mode, ev in events:
            args += [rid, mode, ev]
        return self._scripts["emit"](args=args, client=client)

    def output_log(self, model: str, request_id: str) -> list[TokenEvent]:
        """The token events already published for a request (what a worker resumes from)."""
        events = (messages.decode(x) for x in self.r.lrange(keys.output_log(model, request_id), 0, -1))
        return [ev for ev in events if isinstance(ev, TokenEvent)]



class AsyncFairQueue:
    """asyncio face of the queue, for the API: admission and cancellation."""

    def __init__(self, client, settings: SchedulerSettings):
        self.r = client
        self.s = settings
        self._scripts = {name: client.register_script(SCRIPTS[name]) for name in ("enqueue", "cancel")}

    async def enqueue(self, req: GenerateRequest, *, weight: float = 1.0, timeout_s: float | None = None,
                      user_cap: int | None = None) -> Admission:
        args = _enqueue_args(req, self.s, weight, timeout_s, user_cap, None)
        return _admission(await self._scripts["enqueue"](args=args))

    async def cancel(self, model: str, request_id: str) -> str:
        return await self._scripts["cancel"](args=[keys.tag(model), request_id])

    async def state(self, model: str, request_id: str) -> str | None:
        """``queued`` or ``running``; None once it is done (or unknown)."""
        return await self.r.hget(keys.request(model, request_id), "state")
