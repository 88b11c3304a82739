"""The ordering rule in plain Python: the twin of ``lua/claim.lua``,
``lua/claim_preempting.lua`` and ``lua/enqueue.lua``. Production never calls the
queue model; tests replay random workloads through both and require the same claim
order. The preemption policy (:func:`pick_victims`, at the end) is plain Python too.

* Tiers: high (rank 2) > normal (1) > low (0).
* Aging: strict priority by tier, except that a request of a tier below the top
  waiting one that has waited ``max_wait_s`` (``AGING_MAX_WAIT_S``) is overdue, and
  overdue requests (the oldest first) take every other claim while there are any. So
  a low request starts within about the bound under sustained high load, and a busy
  lower tier can never take more than half the slots from higher work.
* Fairness within a tier: start-time fair queueing on token cost. A request's start
  tag is ``max(V, F_user)``; the user's finish tag becomes ``start + cost/weight``;
  the head request with the smallest start tag goes first (ties: by user name, as
  Redis orders equal scores); V becomes the start tag of the request last claimed.
  When a tier has nothing left waiting its busy period ends: V moves to the largest
  finish tag. A finish tag at or below V means the same as none, so it is dropped:
  the state holds only users with recent work.
* A claim counts sequences (a request's ``n``): it stops at the first request in
  order that would take the claim past its size, unless nothing was claimed yet.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from broker.messages import Batch, Running, Tier

TIERS = tuple(t.value for t in Tier)
RANK = {t.value: t.rank for t in Tier}
PREEMPT_SCAN_USERS = 64
"""Users per tier (in fair order) a preempting claim looks at."""


@dataclass
class _Waiting:
    rid: str
    user: str
    tier: str
    cost: float
    start: float
    enq: float
    seqs: int = 1
    weight: float = 1.0


@dataclass
class FairQueueModel:
    """In-memory model of one model's queue."""

    max_wait_s: float
    virtual: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TIERS})
    finish: dict[tuple[str, str], float] = field(default_factory=dict)
    queues: dict[tuple[str, str], deque] = field(default_factory=dict)
    by_age: dict[str, OrderedDict] = field(default_factory=lambda: {t: OrderedDict() for t in TIERS})
    last_overdue: bool = False
    running: dict[str, _Waiting] = field(default_factory=dict)
    """Claimed requests, so that a preempted one can go back where it was."""

    def enqueue(self, rid: str, user: str, tier: str, cost: float, weight: float, now: float,
                seqs: int = 1) -> None:
        start = max(self.virtual[tier], self.finish.get((tier, user), 0.0))
        self.finish[(tier, user)] = start + cost / weight
        item = _Waiting(rid, user, tier, cost, start, now, seqs, weight)
        self.queues.setdefault((tier, user), deque()).append(item)
        self.by_age[tier][rid] = item

    def _fair_head(self, tier: str) -> _Waiting:
        heads = [q[0] for (t, _), q in self.queues.items() if t == tier and q]
        # Redis sorted sets order equal scores by member name: do the same.
        return min(heads, key=lambda w: (w.start, w.user))

    def _take(self, item: _Waiting) -> None:
        tier = item.tier
        self.queues[(tier, item.user)].remove(item)
        del self.by_age[tier][item.rid]
        if not self.by_age[tier]:  # the tier's busy period ends
            tags = [f for (t, _), f in self.finish.items() if t == tier]
            self.virtual[tier] = max([self.virtual[tier], *tags])
        self.virtual[tier] = max(self.virtual[tier], item.start)
        self.finish = {k: f for k, f in self.finish.items() if k[0] != tier or f > self.virtual[tier]}
        self.running[item.rid] = item

    def requeue(self, rid: str) -> None:
        """A running request goes back to the head of its user's queue with its tags
        (preempted, or handed back by a failing worker)."""
        item = self.running.pop(rid)
        self.queues.setdefault((item.tier, item.user), deque()).appendleft(item)
        self.by_age[item.tier][rid] = item

    def claim_preempting(self, batch: Batch, min_run_steps: int) -> list[tuple[str, list[str], str]]:
        """Waiting requests that may preempt part of a full ``batch``: tiers high to
        low, users in fair order, each user's head only; returns (request, victims,
        reason) in claim order."""
        out = []
        running = list(batch.running)
        while True:
            pick = None
            for tier in TIERS:
                heads = sorted((q[0] for (t, _), q in self.queues.items() if t == tier and q),
                               key=lambda w: (w.start, w.user))
                for item in heads[:PREEMPT_SCAN_USERS]:
                    got = pick_victims(Batch(batch.slots, tuple(running)), item.user, tier, item.weight, item.seqs,
                                       min_run_steps)
                    if got and got[0]:  # only with victims: a batch with room claims the usual way
                        pick = item, got
                        break
                if pick:
                    break
            if pick is None:
                return out
            item, (victims, reason) = pick
            self._take(item)
            gone = {v.rid for v in victims}
            running = [r for r in running if r.rid not in gone]
            running.append(Running(item.rid, item.user, item.tier, item.weight, item.seqs, 0, 0))
            out.append((item.rid, [v.rid for v in victims], reason))

    def claim(self, n: int, now: float) -> list[str]:
        """Request ids in claim order, until they bring ``n`` sequences."""
        out, taken = [], 0
        while taken < n:
            heads = {t: min(self.by_age[t].values(), key=lambda w: (w.enq, w.rid)) for t in TIERS if self.by_age[t]}
            if not heads:
                break
            top = max(RANK[t] for t in heads)
            overdue = [(now - w.enq, t) for t, w in heads.items() if RANK[t] < top and now - w.enq >= self.max_wait_s]
            if overdue and not self.last_overdue:
                # the longest wait; on a tie the tier that comes first in TIERS, as the Lua
                tier = max(overdue, key=lambda x: (x[0], -TIERS.index(x[1])))[1]
                item = heads[tier]
            else:
                tier = next(t for t in TIERS if t in heads and RANK[t] == top)
                item = self._fair_head(tier)
            if taken and taken + item.seqs > n:
                break
            self.last_overdue = bool(overdue and not self.last_overdue)
            self._take(item)
            out.append(item.rid)
            taken += item.seqs
        return out


# -- preemption ---------------------------------------------------------------------
#
# When a worker's batch is full, a waiting request may take a running one's rows
# (twin: ``pick_victims`` in ``lua/common.lua``, used by ``lua/claim_preempting.lua``).
#
# * It qualifies by tier: a running request of a lower tier than its own, or by share:
#   its user's rows plus its own stay within its user's weighted share of the batch,
#   while the victim's user keeps at least its own share after losing the victim.
#   Shares: ``slots * weight / sum of the weights of the users running`` (the
#   newcomer's included). The two-sided rule cannot bounce back: the victim's user is
#   at or over its share afterwards, so the returned request cannot take the rows back.
# * A user never preempts its own requests, and a request that has run fewer than
#   ``min_run_steps`` engine steps since it was (re)admitted is not preempted (the
#   thrash guard).
# * Victims: the lowest tier first, then the user most over its share, then the
#   request that loses least work (fewest computed tokens), then the id.


def pick_victims(batch: Batch, user: str, tier: str, weight: float, need: int,
                 min_run_steps: int) -> tuple[list[Running], str] | None:
    """The requests a newcomer (``need`` rows) may preempt, and why (``tier`` or
    ``share``); None if it does not qualify. ``[]`` when the batch has room anyway."""
    free = batch.slots - sum(r.seqs for r in batch.running)
    if free >= need:
        return [], ""
    rows: dict[str, int] = {}
    weights: dict[str, float] = {}
    for r in batch.running:
        rows[r.user] = rows.get(r.user, 0) + r.seqs
        weights[r.user] = max(weights.get(r.user, 0.0), r.weight)
    weights[user] = max(weights.get(user, 0.0), weight)
    total = sum(weights[u] for u in sorted(weights))

    def share(u: str) -> float:
        return batch.slots * weights[u] / total

    rank = RANK[tier]
    under = rows.get(user, 0) + need <= share(user)
    pool = [r for r in batch.running if r.user != user and r.steps >= min_run_steps and RANK[r.tier] <= rank]
    victims: list[Running] = []
    while free < need:
        best, best_key = None, None
        for r in pool:
            if RANK[r.tier] == rank and not (under and rows[r.user] - r.seqs >= share(r.user)):
                continue
            key = (RANK[r.tier], -(rows[r.user] - share(r.user)), r.work, r.rid)
            if best_key is None or key < best_key:
                best, best_key = r, key
        if best is None:
            return None
        victims.append(best)
        pool.remove(best)
        rows[best.user] -= best.seqs
        free += best.seqs
    return victims, "tier" if RANK[victims[0].tier] < rank else "share"
