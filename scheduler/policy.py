"""The ordering rule in plain Python: the twin of ``lua/claim.lua`` and
``lua/enqueue.lua``. Production never calls this; tests replay random workloads
through both and require the same claim order.

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

from broker.messages import Tier

TIERS = tuple(t.value for t in Tier)
RANK = {t.value: t.rank for t in Tier}


@dataclass
class _Waiting:
    rid: str
    user: str
    tier: str
    cost: float
    start: float
    enq: float
    seqs: int = 1


@dataclass
class FairQueueModel:
    """In-memory model of one model's queue."""

    max_wait_s: float
    virtual: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TIERS})
    finish: dict[tuple[str, str], float] = field(default_factory=dict)
    queues: dict[tuple[str, str], deque] = field(default_factory=dict)
    by_age: dict[str, OrderedDict] = field(default_factory=lambda: {t: OrderedDict() for t in TIERS})
    last_overdue: bool = False

    def enqueue(self, rid: str, user: str, tier: str, cost: float, weight: float, now: float,
                seqs: int = 1) -> None:
        start = max(self.virtual[tier], self.finish.get((tier, user), 0.0))
        self.finish[(tier, user)] = start + cost / weight
        item = _Waiting(rid, user, tier, cost, start, now, seqs)
        self.queues.setdefault((tier, user), deque()).append(item)
        self.by_age[tier][rid] = item

    def _fair_head(self, tier: str) -> _Waiting:
        heads = [q[0] for (t, _), q in self.queues.items() if t == tier and q]
        # Redis sorted sets order equal scores by member name: do the same.
        return min(heads, key=lambda w: (w.start, w.user))

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
            self.queues[(tier, item.user)].remove(item)
            del self.by_age[tier][item.rid]
            if not self.by_age[tier]:  # the tier's busy period ends
                tags = [f for (t, _), f in self.finish.items() if t == tier]
                self.virtual[tier] = max([self.virtual[tier], *tags])
            self.virtual[tier] = max(self.virtual[tier], item.start)
            self.finish = {k: f for k, f in self.finish.items() if k[0] != tier or f > self.virtual[tier]}
            out.append(item.rid)
            taken += item.seqs
        return out
