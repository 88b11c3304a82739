"""What the API and the workers call: admit, claim (also to preempt), extend, complete,
requeue, reap, cancel.

Each operation is one Lua script (``lua/``), so every state change is atomic. A script
gets the model's fixed keys as ``KEYS`` (``scheduler.keys``), so it runs on the node
that holds the model's hash slot, and touches nothing outside it. ``FairQueue`` wraps
a sync client (workers, tools, tests); ``AsyncFairQueue`` an asyncio client (the API).
Either client may be a plain Redis, a Sentinel-managed primary or a Redis Cluster
(``broker.connection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import orjson
from redis.exceptions import NoScriptError

from broker import messages
from broker.messages import Batch, Claimed, GenerateRequest, Tier, TokenEvent
from scheduler import keys
from scheduler.settings import SchedulerSettings

SCRIPT_NAMES = ("enqueue", "claim", "claim_preempting", "cancel", "extend", "complete", "requeue", "reap",
                "kv_index", "emit", "read_log")


def _source(name: str) -> str:
    lua = resources.files("scheduler") / "lua"
    # "#!lua": Redis 7 then refuses any key outside the slot of the declared KEYS, so a
    # script that strayed would fail on a single Redis as it would on a Cluster.
    return "#!lua\n" + keys.lua_prelude() + (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


SCRIPTS = {name: _source(name) for name in SCRIPT_NAMES}


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
    fields = [keys.state_field("waiting_tier", t) for t in Tier]
    pipe = client.pipeline(transaction=False)
    for model in models:
        pipe.hmget(keys.state(model), fields)
    return {model: {t.value: int(n or 0) for t, n in zip(Tier, lens)} for model, lens in zip(models, pipe.execute())}


def _now_arg(now: float | None) -> str:
    return "" if now is None else repr(now)


def _enqueue_args(req: GenerateRequest, s: SchedulerSettings, weight: float, timeout_s: float | None,
                  user_cap: int | None, now: float | None):
    return [
        req.id, messages.encode(req), req.user, str(req.tier), req.cost, weight,
        s.default_deadline_s if timeout_s is None else timeout_s, s.max_queue, s.tier_share(req.tier),
        s.max_queue_per_user if user_cap is None else user_cap, _now_arg(now), "1" if s.fairness else "0",
        req.session_key or "", orjson.dumps(req.prefix_hashes), s.affinity_window_s, req.seqs,
    ]


def _admission(res) -> Admission:
    if res[0] == "ok":
        return Admission(True, queued=int(res[1]))
    return Admission(False, reason=res[0], retry_after_s=int(res[1]), detail=str(res[2]))


class _Scripts:
    """The scripts registered on one client; ``call`` runs one for a model.

    A node with an empty script cache (restarted, or a replica that just took over)
    answers EVALSHA with NOSCRIPT. redis-py then loads the script and tries again, but
    on a Cluster whose slot map is stale the load can miss that node; so a second
    NOSCRIPT sends the script itself (EVAL). In a pipeline, which cannot retry, it is
    EVAL from the start (``execute_command``: a Cluster pipeline blocks its eval())."""

    def __init__(self, client, names=SCRIPT_NAMES):
        self.r = client
        self._scripts = {name: client.register_script(SCRIPTS[name]) for name in names}

    def _eval_args(self, name: str, model: str, args: list) -> tuple:
        return (SCRIPTS[name], len(keys.FIXED), *keys.fixed(model), *args)

    def call(self, name: str, model: str, args: list, pipe=None):
        if pipe is not None:
            return pipe.execute_command("EVAL", *self._eval_args(name, model, args))
        try:
            return self._scripts[name](keys=keys.fixed(model), args=args)
        except NoScriptError:
            return self.r.eval(*self._eval_args(name, model, args))

    async def acall(self, name: str, model: str, args: list):
        """:meth:`call` on an asyncio client."""
        try:
            return await self._scripts[name](keys=keys.fixed(model), args=args)
        except NoScriptError:
            return await self.r.eval(*self._eval_args(name, model, args))


class FairQueue:
    """Synchronous face of the queue (workers, tests, tools)."""

    def __init__(self, client, settings: SchedulerSettings):
        self.r = client
        self.s = settings
        self._scripts = _Scripts(client)

    def enqueue(self, req: GenerateRequest, *, weight: float = 1.0, timeout_s: float | None = None,
                user_cap: int | None = None, now: float | None = None) -> Admission:
        """Admit ``req`` (it must start within ``timeout_s``) or say why not."""
        args = _enqueue_args(req, self.s, weight, timeout_s, user_cap, now)
        return _admission(self._scripts.call("enqueue", req.model, args))

    def claim_batch(self, model: str, worker_id: str, n: int, *, now: float | None = None) -> ClaimResult:
        """Atomically take requests for ``model`` in policy order, leased to ``worker_id``,
        until they bring ``n`` sequences (an engine's free rows; see lua/claim.lua)."""
        if n <= 0:
            return ClaimResult([], [])
        claimed, expired = self._scripts.call(
            "claim", model, [worker_id, n, self.s.lease_s, self.s.aging_max_wait_s, _now_arg(now)])
        return ClaimResult([_claimed(c) for c in claimed], [messages.decode(p) for p in expired])

    def claim_preempting(self, model: str, worker_id: str, batch: Batch, *, now: float | None = None) -> ClaimResult:
        """The worker's batch is full: atomically take the waiting requests that may
        preempt part of it (``scheduler.policy``), each with its victims."""
        claimed, expired = self._scripts.call(
            "claim_preempting", model,
            [worker_id, self.s.lease_s, orjson.dumps(batch.to_json()), self.s.preempt_min_run_steps, _now_arg(now)]
        )
        return ClaimResult([_claimed(c) for c in claimed], [messages.decode(p) for p in expired])

    def requeue(self, model: str, worker_id: str, request_id: str, kind: str, *, pipe=None,
                now: float | None = None) -> str:
        """Hand a running request back to the head of its user's queue (``kind``:
        ``preempted``, ``drained`` or ``failed``); see lua/requeue.lua for the answers.
        With ``pipe``, queued on that pipeline instead."""
        return self._scripts.call("requeue", model, [worker_id, request_id, kind, self.s.max_attempts, _now_arg(now),
                                                     self.s.output_log_ttl_s], pipe)

    def wait_for_work(self, model: str, worker_id: str, timeout_s: float) -> bool:
        """Block until the model's doorbell, or this worker's own (a request reserved for
        it), rings, or ``timeout_s`` passes; True if one rang. Both lists share the
        model's slot, so one BLPOP waits on them on a Cluster too."""
        return self.r.blpop([keys.doorbell(model), keys.worker_doorbell(model, worker_id)], timeout=timeout_s) \
            is not None

    def extend_leases(self, model: str, worker_id: str, request_ids: list[str], *, now: float | None = None) -> list[str]:
        """Renew this worker's leases; returns ids it must drop (cancelled or taken over)."""
        if not request_ids:
            return []
        return list(self._scripts.call("extend", model, [worker_id, self.s.lease_s, _now_arg(now), *request_ids]))

    def complete(self, model: str, worker_id: str, request_id: str, *, pipe=None):
        """Release a finished request (lease owner only); True if this worker owned it.
        With ``pipe``, queued on that pipeline instead."""
        res = self._scripts.call("complete", model, [worker_id, request_id, self.s.output_log_ttl_s], pipe)
        return res if pipe is not None else bool(res)

    def reap_lock(self, model: str, worker_id: str, period_s: float) -> bool:
        """Take this period's turn to reap the model (one worker per period does)."""
        return bool(self.r.set(keys.reaper_lock(model), worker_id, nx=True, px=int(period_s * 1000)))

    def reap(self, model: str, *, now: float | None = None) -> tuple[list[str], list[GenerateRequest]]:
        """Requeue the requests of dead workers (silent for ``worker_dead_s``) and lapsed
        leases; returns (requeued ids, requests out of attempts)."""
        requeued, failed = self._scripts.call(
            "reap", model, [self.s.max_attempts, _now_arg(now), self.s.output_log_ttl_s, self.s.worker_dead_s])
        return list(requeued), [messages.decode(failed[i + 1]) for i in range(0, len(failed), 2)]

    def cancel(self, model: str, request_id: str) -> str:
        return self._scripts.call("cancel", model, [request_id])

    def kv_index(self, model: str, worker_id: str, ops: list[tuple[str, str, str, int]], ttl_s: float, *,
                 pipe=None, now: float | None = None) -> None:
        """Apply KV-index ops ``(op, kind, key, tokens)`` for this worker (see lua/kv_index.lua)."""
        if ops:
            args = [worker_id, ttl_s, _now_arg(now)] + [x for op in ops for x in op]
            self._scripts.call("kv_index", model, args, pipe)

    def depth(self, model: str) -> dict[str, int]:
        return depths(self.r, [model])[model]

    def emit(self, model: str, worker_id: str, channel: str, events: list[tuple[str, str, bytes]], *,
             pipe=None):
        """Append ``(request id, mode, encoded event)`` to the output logs and publish
        them on ``channel`` (the reply channel of one API process for ``model``), fenced
        by lease owner (``lua/emit.lua``); returns the ids this worker no longer owns
        (their events were dropped). With ``pipe``, queued on that pipeline instead."""
        args = [worker_id, channel, self.s.output_log_ttl_s]
        for rid, mode, ev in events:
            args += [rid, mode, ev]
        return self._scripts.call("emit", model, args, pipe)

    def output_log(self, model: str, request_id: str) -> list[TokenEvent]:
        """The token events already published for a request (what a worker resumes from)."""
        events = (messages.decode(x) for x in self.r.lrange(keys.output_log(model, request_id), 0, -1))
        return [ev for ev in events if isinstance(ev, TokenEvent)]

    def output_logs(self, requests: list[tuple[str, str]]) -> list[list]:
        """The whole logs (every event, errors too) of several ``(model, request id)``,
        in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for model, rid in requests:
            pipe.lrange(keys.output_log(model, rid), 0, -1)
        return [[messages.decode(x) for x in raw] for raw in pipe.execute()]


class AsyncFairQueue:
    """asyncio face of the queue, for the API: admission, cancellation, the output log."""

    def __init__(self, client, settings: SchedulerSettings):
        self.r = client
        self.s = settings
        self._scripts = _Scripts(client, ("enqueue", "cancel", "read_log"))

    async def enqueue(self, req: GenerateRequest, *, weight: float = 1.0, timeout_s: float | None = None,
                      user_cap: int | None = None) -> Admission:
        args = _enqueue_args(req, self.s, weight, timeout_s, user_cap, None)
        return _admission(await self._scripts.acall("enqueue", req.model, args))

    async def cancel(self, model: str, request_id: str) -> str:
        """Dequeue a waiting request, or flag a running one and announce it to the
        model's workers (``lua/cancel.lua``)."""
        return await self._scripts.acall("cancel", model, [request_id])

    async def state(self, model: str, request_id: str) -> str | None:
        """``queued`` or ``running``; None once it is done (or unknown)."""
        return await self.r.hget(keys.request(model, request_id), "state")

    async def read_log(self, model: str, request_id: str, since: int) -> tuple[list, int, bool]:
        """The request's output log from entry ``since`` on, the log's length, and whether
        the request is still queued or running, read at one instant (``lua/read_log.lua``;
        a script, not a MULTI: redis-py's asyncio Cluster client runs a transaction on a
        thread of its own and blocks the event loop meanwhile)."""
        exists, length, raw = await self._scripts.acall("read_log", model, [request_id, since])
        return [messages.decode(x) for x in raw], int(length), bool(exists)
