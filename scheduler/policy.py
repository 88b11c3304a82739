"""The ordering rule in plain Python: the twin of ``lua/claim.lua`` and
``lua/enqueue.lua``. Production never calls this; tests replay random workloads
through both and require the same claim order.

* Tiers: high (rank 2) > normal (1) > low (0).
* Aging (starvation freedom): strict priority by tier, except that a tier which
  has had waiting work but no claim for ``max_wait_s`` (``AGING_MAX_WAIT_S``) is
  starved and goes next; among starved tiers, the longest-starved first. The clock
  of a tier runs from the later of its last claim and its oldest waiting request.
  So a low request starts within the bound under sustained high load, while a
  lower tier that is merely busy (served, but backlogged) never outranks fresh high
  work. The starved tier yields its fair-queue head.
* Fairness within a tier: start-time fair queueing on token cost. A request's start
  tag is ``max(V, F_user)``; the user's finish tag becomes ``start + cost/weight``;
  the head request with the smallest start tag goes first (ties: by user name, as
  Redis orders equal scores); V becomes the start tag of the request last claimed.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

RANK = {"high": 2, "normal": 1, "low": 0}
TIERS = ("high", "normal", "low")
MAX_LEVEL = 3


def effective_level(tier: str, starved_s: float, max_wait_s: float) -> int:
    return MAX_LEVEL if starved_s >= max_wait_s else RANK[tier]


@dataclass
class _Waiting:
    rid: str
    user: str
    tier: str
    cost: float
    start: float
    enq: float


@dataclass
class FairQueueModel:
    """In-memory model of one model's queue."""

    max_wait_s: float
    virtual: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TIERS})
    finish: dict[tuple[str, str], float] = field(default_factory=dict)
    queues: dict[tuple[str, str], deque] = field(default_factory=dict)
    by_age: dict[str, OrderedDict] = field(default_factory=lambda: {t: OrderedDict() for t in TIERS})
    served: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TIERS})

    def enqueue(self, rid: str, user: str, tier: str, cost: float, weight: float, now: float) -> None:
        start = max(self.virtual[tier], self.finish.get((tier, user), 0.0))
        self.finish[(tier, user)] = start + cost / weight
        item = _Waiting(rid, user, tier, cost, start, now)
        self.queues.setdefault((tier, user), deque()).append(item)
        self.by_age[tier][rid] = item

    def _fair_head(self, tier: str) -> _Waiting:
        heads = [q[0] for (t, _), q in self.queues.items() if t == tier and q]
        # Redis sorted sets order equal scores by member name: do the same.
        return min(heads, key=lambda w: (w.start, w.user))

    def claim(self, n: int, now: float) -> list[str]:
        out = []
        while len(out) < n:
            best = None
            for tier in TIERS:
                if not self.by_age[tier]:
                    continue
                oldest = min(self.by_age[tier].values(), key=lambda w: (w.enq, w.rid))
                starved = now - max(oldest.enq, self.served[tier])
                level = effective_level(tier, starved, self.max_wait_s)
                if best is None or level > best[0] or (level == MAX_LEVEL == best[0] and starved > best[1]):
                    best = (level, starved, tier)
            if best is None:
                break
            tier = best[2]
            item = self._fair_head(tier)
            self.served[tier] = now
            self.queues[(tier, item.user)].remove(item)
            del self.by_age[tier][item.rid]
            self.virtual[tier] = max(self.virtual[tier], item.start)
            out.append(item.rid)
        return out
