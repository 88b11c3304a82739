"""Decides each step: which waiting sequences join, which prefill how many tokens,
which decode. Admission is by KV blocks: a sequence joins when a cache slot is free
and the blocks it could ever need (prompt plus ``max_tokens``) fit beside everyone
admitted; leaving closes its slot. Nothing moves when sequences come and go. No
torch here; tests drive it with a fake cache."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from gpu_worker.text.sequence import Sequence, SeqStatus


class Slots(Protocol):
    def can_open(self, max_tokens: int) -> bool: ...
    def open(self, slot: int, max_tokens: int) -> None: ...
    def close(self, slot: int) -> None: ...


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)
    """Sequences decoding one token each."""
    prefill: list[Sequence] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    """Tokens each prefill sequence runs this step (less than pending = chunked)."""

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class StepPlanner:
    def __init__(self, slots: Slots, *, max_seqs: int, max_prefill_tokens: int, static: bool = False,
                 on_admit=None):
        self.slots = slots
        self.on_admit = on_admit
        """Called with each sequence as it gets its slot, before its prefill is planned
        (the engine restores reused KV caches there)."""
        self.max_seqs = max_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.static = static
        """Static batching (the baseline): admit only when the batch is empty."""
        self.waiting: deque[Sequence] = deque()
        self.admitted: list[Sequence] = []
        """In admission order."""
        self._free = list(range(max_seqs))  # a heap: the lowest slot first

    # -- state ------------------------------------------------------------------

    @property
    def num_admitted(self) -> int:
        return len(self.admitted)

    def free_capacity(self) -> int:
        return max(0, self.max_seqs - len(self.admitted) - len(self.waiting))

    def has_work(self) -> bool:
        return bool(self.waiting or self.admitted)

    # -- transitions ------------------------------------------------------------

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue a sequence for a slot; ``first``: ahead of the others (it preempted
        running ones to get theirs)."""
        seq.status = SeqStatus.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        if not self.static or not self.admitted:
            while self.waiting and self._free:
                seq = self.waiting[0]
                if self.admitted and not self.slots.can_open(seq.max_length):
                    break  # first come, first served: nobody overtakes the head
                self.waiting.popleft()
                seq.slot = heapq.heappop(self._free)
                self.slots.open(seq.slot, seq.max_length)
                seq.status = SeqStatus.PREFILLING
                self.admitted.append(seq)
                if self.on_admit:
                    self.on_admit(seq)
        plan = StepPlan()
        budget = self.max_prefill_tokens
        for seq in self.admitted:
            if seq.status == SeqStatus.RUNNING:
                plan.decode.append(seq)
            elif seq.status == SeqStatus.PREFILLING and budget > 0:
                chunk = min(seq.pending_prefill, budget)
                plan.prefill.append(seq)
                plan.chunks.append(chunk)
                budget -= chunk
        return plan

    def promote(self, seq: Sequence) -> None:
        """Prefill done: the sequence decodes from now on."""
        seq.status = SeqStatus.RUNNING

    def retire(self, seq: Sequence) -> None:
        """Close a finished (or aborted) sequence's slot."""
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        self.slots.close(seq.slot)
        heapq.heappush(self._free, seq.slot)
        self.admitted.remove(seq)
        seq.slot = -1

    def clear(self) -> None:
        """Forget everything (the engine hands all its requests back)."""
        for seq in self.admitted:
            self.slots.close(seq.slot)
            seq.slot = -1
        self.admitted.clear()
        self.waiting.clear()
        self._free = list(range(self.max_seqs))
