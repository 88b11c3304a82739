"""Decides each step: which waiting sequences join, which prefill how many tokens,
which decode. Owns the row layout of the batch KV cache (rows ``[0, n_running)``
decode, ``[n_running, n)`` prefill) and asks the cache to move rows when
sequences come and go. No torch here; tests drive it with a fake row mover."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from gpu_worker.text.sequence import Sequence, SeqStatus


class RowMover(Protocol):
    def move_row(self, src: int, dst: int) -> None: ...
    def swap_rows(self, a: int, b: int) -> None: ...
    def fits(self, rows: int, length: int) -> bool: ...


@dataclass
class StepPlan:
    prefill: list[Sequence] = field(default_factory=list)
    """Contiguous rows starting at ``prefill[0].slot``."""
    chunks: list[int] = field(default_factory=list)
    """Tokens each prefill sequence runs this step (less than pending = chunked)."""
    decode: list[Sequence] = field(default_factory=list)
    """Rows ``[0, len(decode))``."""

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class StepPlanner:
    def __init__(self, rows: RowMover, *, max_seqs: int, max_prefill_tokens: int, static: bool = False,
                 on_admit=None):
        self.rows = rows
        self.on_admit = on_admit
        """Called with each sequence as it gets its row, before its prefill is planned
        (the engine restores reused KV caches there)."""
        self.max_seqs = max_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.static = static
        """Static batching (the baseline): admit only when the batch is empty."""
        self.waiting: deque[Sequence] = deque()
        self.slots: list[Sequence] = []
        self.n_running = 0

    # -- state ------------------------------------------------------------------

    @property
    def num_admitted(self) -> int:
        return len(self.slots)

    def free_capacity(self) -> int:
        return max(0, self.max_seqs - len(self.slots) - len(self.waiting))

    def has_work(self) -> bool:
        return bool(self.waiting or self.slots)

    def used_len(self) -> int:
        """Cache columns in use over all admitted rows."""
        return max((s.num_computed for s in self.slots), default=0)

    # -- transitions ------------------------------------------------------------

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue a sequence for a row; ``first``: ahead of the others (it preempted
        running ones to get theirs)."""
        seq.status = SeqStatus.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        if not self.static or not self.slots:
            while self.waiting and len(self.slots) < self.max_seqs:
                # Admit only what the KV cache budget can hold at everyone's full length.
                need = max([s.max_length for s in self.slots] + [self.waiting[0].max_length])
                if self.slots and not self.rows.fits(len(self.slots) + 1, need):
                    break
                seq = self.waiting.popleft()
                seq.slot = len(self.slots)
                seq.status = SeqStatus.PREFILLING
                self.slots.append(seq)
                if self.on_admit:
                    self.on_admit(seq)
        plan = StepPlan(decode=self.slots[: self.n_running])
        budget = self.max_prefill_tokens
        for seq in self.slots[self.n_running:]:
            if budget <= 0:
                break
            chunk = min(seq.pending_prefill, budget)
            plan.prefill.append(seq)
            plan.chunks.append(chunk)
            budget -= chunk
        return plan

    def promote(self, seq: Sequence) -> None:
        """Prefill done: the sequence moves to the decoding rows."""
        boundary = self.n_running
        if seq.slot != boundary:
            other = self.slots[boundary]
            self.rows.swap_rows(seq.slot, boundary)
            self.slots[seq.slot], self.slots[boundary] = other, seq
            other.slot, seq.slot = seq.slot, boundary
        seq.status = SeqStatus.RUNNING
        self.n_running += 1

    def retire(self, seq: Sequence) -> None:
        """Free a finished (or aborted) sequence's row, keeping both regions contiguous."""
        if seq.slot < 0:
            if seq in self.waiting:
                self.waiting.remove(seq)
            return
        row = seq.slot
        if row < self.n_running:
            last_running = self.n_running - 1
            self._move(last_running, row)
            self.n_running -= 1
            row = last_running
        self._move(len(self.slots) - 1, row)
        self.slots.pop()
        seq.slot = -1

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self.rows.move_row(src, dst)
        moved = self.slots[src]
        self.slots[dst] = moved
        moved.slot = dst
