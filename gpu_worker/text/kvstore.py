"""KV caches kept in host DRAM between requests: per-session caches (one user's
conversation) and shared prefix caches (a system prompt many requests start with).

An entry holds token ids and, per layer, the (key, value) tensors of those tokens
(pinned CPU memory when the model runs on CUDA). The store is an LRU bounded by a
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
    layers: Layers
    nbytes: int
    hashes: list[str] = field(default_factory=list)
    """Prefix entries: the block hashes they cover (index keys)."""
    scope: str = ""
    """Prefix entries: the cache scope that may reuse them (broker.prefix)."""
    in_use: int = 0
    last_use: float = field(default_factory=time.time)


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
    evictions: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KvStore:
    def __init__(self, budget_bytes: int, *, pin: bool = False):
        self.budget_bytes = budget_bytes
        self.pin = pin
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
        the entries evicted to make room. ``scope``: a prefix entry's cache scope."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
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
        if self.pin:
            layers = [(k.pin_memory(), v.pin_memory()) for k, v in layers]
        entry = KvEntry(key, kind, list(token_ids), layers, nbytes, scope=scope)
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
