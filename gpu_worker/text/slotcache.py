"""The KV cache layout for CPUs: one dense row per cache slot, and attention in place.

On a CPU the paged layout costs more than it saves. Its SDPA path gathers every
decoding sequence's blocks into a fresh tensor in each layer of each step, and SDPA
then reads keys whose positions are ``kv_heads * head_dim`` apart. Measured on a
2-core EPYC at 32 sequences of about 150 tokens: 30 layers of decode attention took
about 150 ms over the paged pool and 60 ms over dense rows. That is some 20% of the
step. So by default a CPU keeps land's slot layout, behind the same interface the
planner, engine and tensor-parallel mirroring use (``open``/``close``/``attach``/
``prepare``/``shrink``/``to_layers``/``from_layers``):

- per layer ``keys``/``values`` of ``[rows, kv_heads, length, head_dim]``; slot ``s``
  is row ``s``, and its token ``p`` sits at column ``p``;
- the tensors grow by doubling, in rows (up to the slots in use) and in length (up to
  the longest sequence), and shrink back once a crowd or a long sequence has left. A
  slot that leaves frees its row in place: nothing moves;
- admission: every admitted row at the longest admitted ``prompt + max_tokens`` must
  fit the budget (rows * length * bytes per token), as before the paged cache;
- ``attach`` copies (a row cannot share another's memory): the shared-prefix-by-reference
  saving is the paged layout's, on GPUs.

``SlotAttention`` is its backend: the decoding slots attend as one SDPA batch over the
rows ``lo..hi`` that hold them, as views (no gather), with a mask only where lengths
differ or a row in the range is not decoding; a prefill chunk attends over its own
row's columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpu_worker.text.attention import SdpaAttention, Step, bottom_right_causal, leading_decodes
from gpu_worker.text.kvcache import Layers, PagedKVCache


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, max_len: int, budget_bytes: int | None = None, init_len: int = 256,
                 init_rows: int = 8):
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.shape_tail = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.max_len = max_len
        self.init_len = min(init_len, max_len)
        self.init_rows = min(init_rows, num_slots)
        self.bytes_per_token = self.token_bytes(num_layers, kv_heads, head_dim, dtype)
        self.budget_bytes = budget_bytes
        """Most bytes the rows may take at everyone's full length (None = no limit)."""
        self._limit = [0] * num_slots
        """Per open slot: the most tokens it may hold (prompt + max_tokens); 0 = closed."""
        self._used = [0] * num_slots
        """Per open slot: columns prepared (written or about to be)."""
        self.rows = self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(self.init_rows, self.init_len)

    token_bytes = staticmethod(PagedKVCache.token_bytes)

    # -- memory -----------------------------------------------------------------

    @torch.inference_mode()
    def _allocate(self, rows: int, length: int) -> None:
        h, d = self.shape_tail
        keep_rows, keep_len = min(rows, self.rows), min(length, self.capacity)
        new_k, new_v = [], []
        for i in range(self.num_layers):
            # zeros, not empty: a masked column gets zero weight, and 0 * NaN garbage is still NaN
            k = torch.zeros(rows, h, length, d, dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if keep_rows and keep_len:
                k[:keep_rows, :, :keep_len] = self.keys[i][:keep_rows, :, :keep_len]
                v[:keep_rows, :, :keep_len] = self.values[i][:keep_rows, :, :keep_len]
            new_k.append(k)
            new_v.append(v)
        self.keys, self.values = new_k, new_v
        self.rows, self.capacity = rows, length

    def _fits(self, rows: int, length: int) -> bool:
        return self.budget_bytes is None or rows * length * self.bytes_per_token <= self.budget_bytes

    def _grow(self, rows: int, length: int) -> None:
        """Room for ``rows`` rows of ``length`` columns: doubling where the budget allows."""
        if rows <= self.rows and length <= self.capacity:
            return
        new_rows = self.rows if rows <= self.rows else min(self.num_slots, max(rows, 2 * self.rows))
        new_len = self.capacity if length <= self.capacity else min(self.max_len, max(length, 2 * self.capacity))
        if not self._fits(new_rows, new_len):  # doubling would overshoot the budget: grow exactly
            new_rows, new_len = max(rows, self.rows), max(length, self.capacity)
        self._allocate(new_rows, new_len)

    def shrink(self) -> None:
        """Give memory back once long sequences or a crowd have left."""
        open_rows = [s for s in range(self.num_slots) if self._limit[s]]
        rows = max(self.init_rows, max(open_rows, default=-1) + 1)
        length = max(self.init_len, max(self._used, default=0))
        if (rows * 4 <= self.rows and rows < self.rows) or (length * 4 <= self.capacity and length < self.capacity):
            self._allocate(max(rows, min(self.rows, 2 * rows)), max(length, min(self.capacity, 2 * length)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def describe(self) -> str:
        return f"a row per slot, up to {self.num_slots} rows of {self.max_len} tokens within the budget"

    # -- slots ------------------------------------------------------------------

    def can_open(self, max_tokens: int) -> bool:
        """Would one more sequence of up to ``max_tokens`` fit, every row at the longest length?"""
        open_rows = [s for s in range(self.num_slots) if self._limit[s]]
        rows = max(max(open_rows, default=-1) + 1, len(open_rows) + 1)  # the planner takes the lowest free slot
        return self._fits(rows, max(self._limit + [min(max_tokens, self.max_len)]))

    def open(self, slot: int, max_tokens: int) -> None:
        if self._limit[slot]:
            raise ValueError(f"slot {slot} is already open")
        self._limit[slot] = max(1, min(max_tokens, self.max_len))

    def close(self, slot: int) -> None:
        self._limit[slot] = self._used[slot] = 0

    @torch.inference_mode()
    def attach(self, dst: int, src: int, tokens: int) -> None:
        """Give ``dst`` the first ``tokens`` positions of ``src`` (a copy)."""
        self.prepare([dst], [tokens])
        for t in self.keys + self.values:
            t[dst, :, :tokens] = t[src, :, :tokens]

    def shared_blocks(self, slot: int) -> int:
        return 0

    def prepare(self, slots: list[int], ends: list[int]) -> None:
        """Before a forward pass: room for positions up to ``ends`` of each slot."""
        for slot, end in zip(slots, ends):
            if end > self._limit[slot]:
                raise MemoryError(f"slot {slot} grew past its {self._limit[slot]} tokens")
            self._used[slot] = max(self._used[slot], end)
        self._grow(max(slots) + 1, max(ends))

    # -- interchange with the DRAM store -----------------------------------------

    @torch.inference_mode()
    def to_layers(self, slot: int, length: int) -> Layers:
        return [(k[slot, :, :length].clone(), v[slot, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    @torch.inference_mode()
    def from_layers(self, slot: int, layers: Layers, length: int) -> None:
        self.prepare([slot], [length])
        for i, (k, v) in enumerate(layers):
            self.keys[i][slot, :, :length].copy_(k[:, :length], non_blocking=True)
            self.values[i][slot, :, :length].copy_(v[:, :length], non_blocking=True)


class SlotAttention(SdpaAttention):
    name = "slots"

    def build(self, cache: SlotKVCache, slots, starts, lens) -> Step:
        b, dev = len(slots), cache.device
        lens_t = torch.tensor(lens)
        seq = torch.repeat_interleave(torch.arange(b), lens_t)
        first = torch.cumsum(lens_t, 0) - lens_t
        positions = torch.tensor(starts)[seq] + torch.arange(int(lens_t.sum())) - first[seq]
        kv_heads = cache.shape_tail[0]
        # The new keys as rows of a layer's tensor viewed as [rows * kv_heads * length, dim],
        # in the order of key[0] ([kv_heads, T, dim]) flattened.
        token_rows = torch.tensor(slots)[seq] * kv_heads * cache.capacity + positions
        flat = (torch.arange(kv_heads).unsqueeze(1) * cache.capacity + token_rows.unsqueeze(0)).flatten()
        n_decode = leading_decodes(lens)
        data: dict = {"flat": flat.to(dev), "n_decode": n_decode, "prefill": []}
        if n_decode:
            decoding = slots[:n_decode]
            lo, hi = min(decoding), max(decoding) + 1
            ends = torch.ones(hi - lo, dtype=torch.long)  # rows in range that are not decoding: column 0 only
            ends[torch.tensor(decoding) - lo] = torch.tensor(starts[:n_decode]) + 1
            longest = int(ends.max())
            in_order = decoding == list(range(lo, hi))
            data["decode"] = (lo, hi, longest, None if in_order else (torch.tensor(decoding) - lo).to(dev))
            uniform = in_order and bool((ends == longest).all())
            data["decode_mask"] = None if uniform else (
                torch.arange(longest).unsqueeze(0) < ends.unsqueeze(1))[:, None, None, :].to(dev)
        off = n_decode
        for j in range(n_decode, b):
            start, n = starts[j], lens[j]
            mask = bottom_right_causal(start, n).to(dev) if start else None
            data["prefill"].append((off, n, (slots[j], start + n), mask))
            off += n
        return Step(cache, self, positions.to(dev), None, lens, starts, data)

    def store(self, step: Step, k_cache, v_cache, key, value) -> None:
        dim = key.shape[-1]
        flat = step.data["flat"]
        k_cache.view(-1, dim).index_copy_(0, flat, key[0].reshape(-1, dim).to(k_cache.dtype))
        v_cache.view(-1, dim).index_copy_(0, flat, value[0].reshape(-1, dim).to(v_cache.dtype))

    def decode(self, step, k_cache, v_cache, q, scale):
        lo, hi, longest, order = step.data["decode"]
        if order is not None:  # decoding rows out of order or with others between: scatter, attend, pick
            q = q.new_zeros(hi - lo, *q.shape[1:]).index_copy_(0, order, q)
        k, v = k_cache[lo:hi, :, :longest], v_cache[lo:hi, :, :longest]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=step.data["decode_mask"],
                                           scale=scale)
        return o if order is None else o.index_select(0, order)

    def cached(self, k_cache, v_cache, where):
        slot, end = where
        return k_cache[slot: slot + 1, :, :end], v_cache[slot: slot + 1, :, :end]
