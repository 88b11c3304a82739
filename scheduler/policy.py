"""The ordering rule in plain Python: the twin of ``lua/claim.lua`` and
``lua/enqueue.lua``. Production never calls this; tests replay random workloads
through both and require the same claim order.

* Tiers: high (rank 2) > normal (1) > low (0).
* Aging: a tier's effective level is its rank plus one per ``step`` seconds
  (``aging_max_wait_s / 3``) its oldest request has waited, capped at 3 ("overdue",
  above high). The highest level goes first; a tie to the higher tier, except
  among overdue tiers, where the longest wait goes first. So a low request outranks
  fresh high work once it has waited ``aging_max_wait_s``. A tier that overtook a
  higher tier by aging yields its oldest request; otherwise its fair-queue head
  (aging alone never turns a tier's fair queue into FIFO).
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


def effective_level(tier: str, waited_s: float, step_s: float) -> int:
    return min(MAX_LEVEL, RANK[tier] + int(waited_s // step_s))


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

    step_s: float
    virtual: dict[str, float] = field(default_factory=lambda: {t: 0.0 for t in TIERS})
    finish: dict[tuple[str, str], float] = field(default_factory=dict)
    queues: dict[tuple[str, str], deque] = field(default_factory=dict)
    by_age: dict[str, OrderedDict] = field(default_factory=lambda: {t: OrderedDict() for t in TIERS})

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
            top_rank = max((RANK[t] for t in TIERS if self.by_age[t]), default=-1)
            for tier in TIERS:
                if not self.by_age[tier]:
                    continue
                oldest = min(self.by_age[tier].values(), key=lambda w: (w.enq, w.rid))
                waited = now - oldest.enq
                level = effective_level(tier, waited, self.step_s)
                if best is None or level > best[0] or (level == MAX_LEVEL == best[0] and waited > best[1]):
                    best = (level, waited, tier, oldest)
            if best is None:
                break
            level, _, tier, oldest = best
            item = oldest if level > RANK[tier] and top_rank > RANK[tier] else self._fair_head(tier)
            self.queues[(tier, item.user)].remove(item)
            del self.by_age[tier][item.rid]
            self.virtual[tier] = max(self.virtual[tier], item.start)
            out.append(item.rid)
        return out
