"""KV caches kept in host DRAM between requests: per-session caches (one user's
conversation) and shared prefix caches (a system prompt many requests start with).

An entry holds token ids and, per layer, the (key, value) tensors of those tokens in
host memory. From a CUDA model they are copied into pinned memory without stalling
the step: the copy is queued on the current stream, behind the kernels that made the
tensors, and a CUDA event marks its end; reading an entry's layers waits for that
event, and restoring them to the device is again a non-blocking copy from pinned
memory. The store is an LRU bounded by a
byte budget with exact accounting (the sum of the tensors' bytes); eviction never
touches an entry that is in use. Prefix entries register the chained hash of every
whole block they cover, so a prompt that shares only part of a stored prefix still
finds it. Nothing here touches Redis: the engine reports what changed and the
worker's publisher keeps the Redis index in step.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from broker.prefix import BLOCK, prefix_hashes

Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class KvEntry:
    key: str
    kind: str  # "session" | "prefix" | "preempted" (a preempted sequence's, until it resumes)
    token_ids: list[int]
    host_layers: Layers
    """Host memory; may still be filling from the device until ``ready`` fires: read ``layers``."""
    nbytes: int
    ready: torch.cuda.Event | None = None
    """Marks the end of the device-to-host copy (CUDA only; None once it has landed)."""
    hashes: list[str] = field(default_factory=list)
    """Prefix entries: the block hashes they cover (index keys)."""
    scope: str = ""
    """Prefix entries: the cache scope that may reuse them (broker.prefix)."""
    in_use: int = 0
    last_use: float = field(default_factory=time.time)

    @property
    def layers(self) -> Layers:
        """The stored tensors, once their copy from the device has landed."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.host_layers


def to_host(layers: Layers) -> tuple[Layers, torch.cuda.Event | None]:
    """Host tensors the store can keep, and the event that marks when they are filled.
    CPU tensors are kept as they are (the caller hands over a private copy); CUDA
    tensors are copied into pinned memory asynchronously (``pin_memory()`` on a CUDA
    tensor raises). The caching host allocator keeps a pinned block from being reused
    before the copies that touch it have finished, so freeing an entry early is safe."""
    if not layers or not layers[0][0].is_cuda:
        return layers, None
    host = []
    for k, v in layers:
        pair = []
        for t in (k, v):
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            pair.append(h)
        host.append((pair[0], pair[1]))
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@dataclass
class KvStats:
    hits: int = 0
    misses: int = 0
    tokens_saved: int = 0
    prompt_tokens: int = 0
    saves: int = 0
    save_s: float = 0.0
    restores: int = 0
    restore_s: float = 0.0
    shared: int = 0
    """Restores served from an admitted sequence's KV instead of from DRAM (``attach``)."""
    evictions: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KvStore:
    def __init__(self, budget_bytes: int, *, scale: tuple[int, int] = (1, 1)):
        """``scale``: under tensor parallelism each rank stores its shard of an entry and
        this store (rank 0's) accounts for the whole group: an entry costs its own bytes
        times ``scale[0] / scale[1]`` (the group's bytes per token over rank 0's)."""
        self.budget_bytes = budget_bytes
        self.scale = scale
        self.entries: OrderedDict[str, KvEntry] = OrderedDict()  # LRU order: oldest first
        self.prefix_index: dict[str, tuple[str, int]] = {}  # block hash -> (entry key, tokens covered)
        self.bytes_used = 0
        self.stats = KvStats()

    # -- lookup -----------------------------------------------------------------

    def match(self, prompt: list[int], session_key: str | None, hashes: list[str],
              scope: str = "") -> tuple[KvEntry, int] | None:
        """The stored entry that covers the longest prefix of ``prompt``, and how many
        of its tokens to reuse (always leaving the last prompt token to prefill). A
        prefix entry counts only for its own cache scope and only when its token ids
        are the prompt's: a 64-bit hash says where to look, never what is there."""
        best: tuple[KvEntry, int] | None = None
        if session_key and session_key in self.entries:
            entry = self.entries[session_key]
            n = common_prefix(entry.token_ids, prompt)
            best = (entry, n)
        for j in range(len(hashes) - 1, -1, -1):
            n = (j + 1) * BLOCK
            if best is not None and n <= best[1]:
                break
            hit = self.prefix_index.get(hashes[j])
            if hit:
                entry = self.entries[hit[0]]
                if entry.scope == scope and entry.token_ids[:n] == prompt[:n]:
                    best = (entry, n)
                    break
        if best is not None:
            best = (best[0], min(best[1], len(prompt) - 1))
        if best is None or best[1] <= 0:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return best

    def acquire(self, entry: KvEntry) -> None:
        entry.in_use += 1
        entry.last_use = time.time()
        self.entries.move_to_end(entry.key)

    def release(self, entry: KvEntry) -> None:
        entry.in_use -= 1

    # -- insertion and eviction ---------------------------------------------------

    def put(self, key: str, kind: str, token_ids: list[int], layers: Layers,
            scope: str = "") -> tuple[KvEntry | None, list[KvEntry]]:
        """Store (replacing ``key``); returns the new entry (None if it cannot fit) and
        the entries evicted to make room. ``scope``: a prefix entry's cache scope.
        ``layers`` may live on the model's device; the store takes them to host memory
        (before changing anything, so a failed copy leaves the store as it was)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        nbytes = nbytes * self.scale[0] // self.scale[1]
        ready = None
        if nbytes <= self.budget_bytes:
            layers, ready = to_host(layers)
        evicted: list[KvEntry] = []
        old = self.entries.get(key)
        if old is not None and old.in_use == 0:
            self._remove(old)
            evicted.append(old)
        if nbytes > self.budget_bytes or (old is not None and old.in_use):
            return None, evicted
        for victim in list(self.entries.values()):  # oldest first
            if self.bytes_used + nbytes <= self.budget_bytes:
                break
            if victim.in_use == 0:
                self._remove(victim)
                evicted.append(victim)
                self.stats.evictions += 1
        if self.bytes_used + nbytes > self.budget_bytes:
            return None, evicted
        entry = KvEntry(key, kind, list(token_ids), layers, nbytes, ready, scope=scope)
        if kind == "prefix":
            entry.hashes = prefix_hashes(entry.token_ids, scope)
            for j, h in enumerate(entry.hashes):
                self.prefix_index[h] = (key, (j + 1) * BLOCK)
        self.entries[key] = entry
        self.bytes_used += nbytes
        self.stats.saves += 1
        return entry, evicted

    def discard(self, entry: KvEntry) -> None:
        """Drop an entry that has served its purpose (a preempted sequence's KV, restored)."""
        if entry.in_use == 0 and self.entries.get(entry.key) is entry:
            self._remove(entry)

    def _remove(self, entry: KvEntry) -> None:
        del self.entries[entry.key]
        self.bytes_used -= entry.nbytes
        for h in entry.hashes:
            if self.prefix_index.get(h, ("",))[0] == entry.key:
                del self.prefix_index[h]

    def session_keys(self) -> list[str]:
        return [k for k, e in self.entries.items() if e.kind == "session"]

    def prefix_hashes_held(self) -> list[str]:
        return list(self.prefix_index)
