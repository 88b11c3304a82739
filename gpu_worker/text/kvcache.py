"""The batch KV cache of the text engine: paged.

Keys and values live in one pool per layer, cut into blocks of ``block_size`` tokens
(``[blocks * block_size, kv_heads, head_dim]``, which is also the
``[blocks, block_size, kv_heads, head_dim]`` layout paged attention kernels read).
Each admitted sequence has a *slot*: a row of the block table listing the blocks
that hold its tokens in order. So

- a sequence takes memory as it grows, one block at a time, and gives it back by
  dropping its references: nothing else moves, and there is no padding to any
  other sequence's length;
- a block may be referenced by several tables (refcounts): a prefix that running
  sequences share (a restored DRAM entry) sits in memory once (``attach``); only a
  partly filled last block is copied, since its owner keeps writing into it;
- admission is by blocks (``can_open``): each sequence reserves the blocks it could
  ever need (prompt plus ``max_tokens``) and takes them from that reservation as it
  grows, so a step never runs out of memory half-way.

The pool's size comes from the model's KV budget. On CUDA it is allocated whole at
load (CUDA graphs replay on fixed addresses); on CPU it grows by doubling as blocks
are taken (the lowest free block first) and shrinks when its top is free again.
Block 0 is never handed out: it stays zero, and padding in attention reads from it.

Every method that changes state is deterministic given the same calls
in the same order, which is what tensor-parallel ranks rely on to keep identical
block tables for their own heads.

``to_layers`` / ``from_layers`` exchange one sequence's cache in the per-layer
``(key, value)`` format ``[kv_heads, tokens, head_dim]`` that the DRAM store keeps
and ``DynamicCache(ddp_cache_data=...)`` accepts.
"""

from __future__ import annotations

import heapq
import inspect
import logging

import torch

log = logging.getLogger(__name__)

NULL_BLOCK = 0

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""The legacy per-layer ``(key, value)`` format, one sequence: ``[kv_heads, tokens, head_dim]``."""

MUTATING = ("open", "close", "attach", "shrink")
"""The methods the engine calls that change the cache's state (tensor-parallel rank 0
mirrors them). ``prepare`` and ``from_layers`` change it too, but only from inside the
runner's forward pass and KV restore, which are mirrored as a whole."""


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` from
    transformers 5.24 on, ``past_key_values`` before (and, deprecated, still after)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockPool:
    """Which blocks are free, how many references each has, and how many are promised
    to admitted sequences (reserved) but not yet taken. Plain Python: no tensors."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        """Usable blocks, ids ``1..num_blocks`` (0 is the null block)."""
        self.refs = [0] * (num_blocks + 1)
        self._free = list(range(1, num_blocks + 1))  # a heap: lowest id first, so a growing pool stays dense
        self.reserved = 0

    @property
    def free(self) -> int:
        return len(self._free)

    def available(self) -> int:
        """Blocks a newcomer may still reserve."""
        return len(self._free) - self.reserved

    def reserve(self, n: int) -> None:
        if n > self.available():
            raise MemoryError(f"{n} KV blocks requested, {self.available()} available")
        self.reserved += n

    def unreserve(self, n: int) -> None:
        self.reserved -= n

    def take(self) -> int:
        """One block out of a reservation made before."""
        self.reserved -= 1
        block = heapq.heappop(self._free)
        self.refs[block] = 1
        return block

    def ref(self, block: int) -> None:
        self.refs[block] += 1

    def unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            heapq.heappush(self._free, block)

    def highest_used(self) -> int:
        """The highest block id in use (0 when none)."""
        for block in range(self.num_blocks, 0, -1):
            if self.refs[block]:
                return block
        return 0


class PagedKVCache:
    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, max_len: int, block_size: int = 64, budget_bytes: int | None = None,
                 grow: bool | None = None, init_blocks: int = 64):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.shape_tail = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.max_len = max_len
        self.block_size = block_size
        self.bytes_per_token = self.token_bytes(num_layers, kv_heads, head_dim, dtype)
        self.budget_bytes = budget_bytes
        self.max_blocks_per_seq = blocks_for(max_len, block_size)
        budget_blocks = (budget_bytes // (self.bytes_per_token * block_size) if budget_bytes is not None
                         else num_slots * self.max_blocks_per_seq)
        if budget_blocks < self.max_blocks_per_seq:
            log.warning("KV budget of %d blocks cannot hold one sequence of the full context (%d tokens): "
                        "raised to %d blocks", budget_blocks, max_len, self.max_blocks_per_seq)
            budget_blocks = self.max_blocks_per_seq
        self.pool = BlockPool(budget_blocks)
        self.grow = device.type != "cuda" if grow is None else grow
        """Grow the pool as blocks are taken (CPU) rather than allocating it whole (CUDA)."""
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]
        self._reserved = [0] * num_slots
        """Blocks each slot may still take from its reservation."""
        self._open = [False] * num_slots
        # The block table as a tensor for the kernels: a host copy edited in place, and
        # the device's, refreshed once per forward pass for the slots that changed.
        self.table_host = torch.zeros(num_slots, self.max_blocks_per_seq, dtype=torch.int32,
                                      pin_memory=device.type == "cuda")
        self.table = self.table_host if device.type == "cpu" else self.table_host.to(device)
        self._dirty: set[int] = set()
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        """Blocks the pool tensors hold now, the null block included."""
        self._min_capacity = budget_blocks + 1 if not self.grow else min(budget_blocks + 1, max(2, init_blocks))
        self._resize(self._min_capacity)

    @staticmethod
    def token_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Keys and values of one token over all layers."""
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    # -- memory -----------------------------------------------------------------

    @torch.inference_mode()
    def _resize(self, blocks: int) -> None:
        h, d = self.shape_tail
        keep = min(blocks, self.capacity) * self.block_size
        new_k, new_v = [], []
        for i in range(self.num_layers):
            # zeros: the null block must be, and unwritten blocks are then the same on every
            # tensor-parallel rank
            k = torch.zeros(blocks * self.block_size, h, d, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if keep:
                k[:keep] = self.keys[i][:keep]
                v[:keep] = self.values[i][:keep]
            new_k.append(k)
            new_v.append(v)
        self.keys, self.values = new_k, new_v
        self.capacity = blocks

    def _take(self, slot: int) -> int:
        if self._reserved[slot] <= 0:
            raise MemoryError(f"slot {slot} grew past its reservation")
        self._reserved[slot] -= 1
        block = self.pool.take()
        if block >= self.capacity:
            self._resize(min(self.pool.num_blocks + 1, max(block + 1, 2 * self.capacity)))
        self.tables[slot].append(block)
        self.table_host[slot, len(self.tables[slot]) - 1] = block
        self._dirty.add(slot)
        return block

    def shrink(self) -> None:
        """Give pool memory back once the blocks at its top are free (CPU)."""
        if not self.grow:
            return
        used = self.pool.highest_used() + 1
        if used * 4 <= self.capacity and self.capacity > self._min_capacity:
            self._resize(max(self._min_capacity, 2 * used))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def describe(self) -> str:
        return (f"paged, {self.num_blocks} blocks of {self.block_size} tokens"
                f"{'' if self.grow else ' (allocated whole)'}")

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    # -- slots ------------------------------------------------------------------

    def can_open(self, max_tokens: int) -> bool:
        """Would a sequence of up to ``max_tokens`` tokens fit next to everyone admitted?"""
        return self.blocks_for(min(max_tokens, self.max_len)) <= self.pool.available()

    def open(self, slot: int, max_tokens: int) -> None:
        """Admit a sequence into ``slot``: reserve the blocks it may need."""
        if self._open[slot]:
            raise ValueError(f"slot {slot} is already open")
        n = self.blocks_for(min(max_tokens, self.max_len))
        self.pool.reserve(n)
        self._reserved[slot] = n
        self._open[slot] = True

    def close(self, slot: int) -> None:
        """The sequence left: drop its references (shared blocks stay with their other
        holders) and what it had reserved but never took."""
        if not self._open[slot]:
            return
        for block in self.tables[slot]:
            self.pool.unref(block)
        self.tables[slot] = []
        self.pool.unreserve(self._reserved[slot])
        self._reserved[slot] = 0
        self._open[slot] = False
        self.table_host[slot].zero_()
        self._dirty.add(slot)

    def length(self, slot: int) -> int:
        """Tokens the slot's blocks can hold."""
        return len(self.tables[slot]) * self.block_size

    @torch.inference_mode()
    def attach(self, dst: int, src: int, tokens: int) -> None:
        """Give ``dst`` (just opened, empty) the first ``tokens`` positions of ``src``:
        the whole blocks by reference, a partly filled last block as a copy."""
        if self.tables[dst]:
            raise ValueError(f"slot {dst} is not empty")
        full, rest = divmod(tokens, self.block_size)
        shared = self.tables[src][:full]
        for block in shared:
            self.pool.ref(block)
        give_back = min(len(shared), self._reserved[dst])
        self._reserved[dst] -= give_back
        self.pool.unreserve(give_back)  # referenced, not taken: the reservation shrinks
        self.tables[dst] = list(shared)
        self.table_host[dst, : len(shared)] = torch.tensor(shared, dtype=torch.int32)
        self._dirty.add(dst)
        if rest:
            block = self._take(dst)
            src_block = self.tables[src][full]
            a, b = block * self.block_size, src_block * self.block_size
            for t in self.keys + self.values:
                t[a: a + rest] = t[b: b + rest]

    def shared_blocks(self, slot: int) -> int:
        """Blocks of this slot that another holder references too."""
        return sum(self.pool.refs[b] > 1 for b in self.tables[slot])

    def prepare(self, slots: list[int], ends: list[int]) -> None:
        """Before a forward pass: each slot gets blocks for positions up to ``ends``."""
        for slot, end in zip(slots, ends):
            need = self.blocks_for(end) - len(self.tables[slot])
            for _ in range(need):
                self._take(slot)

    def sync_table(self) -> torch.Tensor:
        """The device block table, with this step's changes copied in (one transfer)."""
        if self._dirty and self.table is not self.table_host:
            rows = sorted(self._dirty)
            if len(rows) > self.num_slots // 2:
                self.table.copy_(self.table_host, non_blocking=True)
            else:
                idx = torch.tensor(rows, dtype=torch.long)
                self.table[idx.to(self.device)] = self.table_host[idx].to(self.device, non_blocking=True)
        self._dirty.clear()
        return self.table

    # -- positions ----------------------------------------------------------------

    def token_slots(self, slot: int, start: int, end: int) -> torch.Tensor:
        """Flat pool indices of positions ``start..end`` of a slot (host tensor)."""
        pos = torch.arange(start, end)
        table = torch.tensor(self.tables[slot], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    # -- interchange with the DRAM store -----------------------------------------

    @torch.inference_mode()
    def to_layers(self, slot: int, length: int) -> Layers:
        """A copy of a slot's first ``length`` positions, one (key, value) per layer."""
        idx = self.token_slots(slot, 0, length).to(self.device)
        return [(k.index_select(0, idx).transpose(0, 1).contiguous(), v.index_select(0, idx).transpose(0, 1).contiguous())
                for k, v in zip(self.keys, self.values)]

    @torch.inference_mode()
    def from_layers(self, slot: int, layers: Layers, length: int) -> None:
        """Write a stored cache into a slot's first ``length`` positions (its blocks are
        taken from the slot's reservation as needed)."""
        self.prepare([slot], [length])
        idx = self.token_slots(slot, 0, length).to(self.device)
        for i, (k, v) in enumerate(layers):
            self.keys[i].index_copy_(0, idx, k[:, :length].transpose(0, 1).to(self.device, self.dtype,
                                                                               non_blocking=True))
            self.values[i].index_copy_(0, idx, v[:, :length].transpose(0, 1).to(self.device, self.dtype,
                                                                                 non_blocking=True))


# -- interchange with transformers' cache formats ---------------------------------


def layers_to_dynamic_cache(layers: Layers, config) -> "DynamicCache":  # noqa: F821
    """One sequence's cache as a transformers ``DynamicCache`` (batch of one)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.unsqueeze(0), v.unsqueeze(0)) for k, v in layers], config=config)


def dynamic_cache_to_layers(cache, row: int = 0) -> Layers:
    """One row of a ``DynamicCache`` (or of a legacy tuple of ``(key, value)``) as layers."""
    if isinstance(cache, (tuple, list)):
        return [(k[row], v[row]) for k, v in cache]
    return [(layer.keys[row], layer.values[row]) for layer in cache.layers]
