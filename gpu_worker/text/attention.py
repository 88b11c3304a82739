"""Attention over the KV cache for one packed forward pass.

The runner packs every scheduled sequence's new tokens into one row
(``input_ids [1, T]``: a decoding sequence brings one token, a prefill chunk many), so
newcomers and running sequences share a single forward pass with no padding. The
transformers model is loaded with the attention implementation ``inferstack``
(``register``); each attention layer then calls ``attention`` with the pass's ``Step``,
whose backend writes the new keys and values into the cache at their tokens' places
and lets every query attend to its own sequence's tokens, causally. Without a ``Step`` (a plain
``model(...)`` call, as tests make for reference outputs) it is transformers' SDPA.

Backends (one per runner):

- ``slots`` (the CPU default, ``slotcache.py``): not paged at all, a dense row per
  cache slot, attended in place.
- ``sdpa`` (paged on CPU, and the fallback anywhere): the decoding sequences as one batch over
  their blocks gathered into ``[batch, kv_heads, longest, head_dim]`` (shorter ones
  padded from the zero block, with a key-padding mask only when lengths differ), the
  query heads of each KV head grouped onto it so no KV is repeated; each prefill
  chunk on its own: ``is_causal`` over its fresh keys (no gather, no mask) when it
  starts the sequence, a bottom-right causal mask over its gathered blocks when it
  continues one.
- ``paged`` (CUDA): torch's flash varlen kernel reading the pool through the block
  table (``varlen_attn(..., seqused_k=, block_table=)``): no gather, and a decode step
  of fixed shapes that CUDA graphs can replay (``graphs.py``). FlashAttention-2 needs
  blocks of 256 tokens, which the runner uses on CUDA.
- ``varlen`` (CUDA, where the kernel has no paged mode): the same kernel over keys
  gathered into one packed tensor.

On CUDA the runner tries ``paged``, then ``varlen``, on a small random problem at load
and keeps the first whose output matches ``sdpa`` (``probe``), so a kernel that is
missing or means something else in the installed torch is never used. The kernel is
injectable: CPU tests run the CUDA backends' bookkeeping (block tables, cumulative
lengths, used lengths, slot mapping) through ``varlen_reference``, a plain-torch
statement of the kernel's contract.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMPLEMENTATION = "inferstack"
"""The attention implementation name registered with transformers."""

STEP_KWARG = "inferstack_step"
"""The keyword the runner passes the ``Step`` by; transformers hands it down to every layer."""


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    step: Step | None = kwargs.pop(STEP_KWARG, None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return step.attend(module.layer_idx, query, key, value, scaling), None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, attention)
    return IMPLEMENTATION


# -- one forward pass -------------------------------------------------------------


@dataclass
class Step:
    """What every layer needs to know about one packed forward pass."""

    cache: object
    backend: "Backend"
    positions: torch.Tensor
    """[T] each new token's position in its sequence."""
    slot_mapping: torch.Tensor | None
    """[T] the flat pool index each new token's key and value are written to (paged)."""
    lens: list[int]
    starts: list[int]
    data: dict = field(default_factory=dict)
    """The backend's own tensors."""

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        k_pool, v_pool = self.cache.keys[layer], self.cache.values[layer]
        self.backend.store(self, k_pool, v_pool, key, value)
        out = self.backend.attend(self, k_pool, v_pool, query, key, value, scale)
        return out.unsqueeze(0)  # [1, T, heads, dim], as transformers' attention functions return


def _host_layout(cache, slots: list[int], starts: list[int], lens: list[int]):
    """Host tensors: positions and flat pool slots of every new token, and the slots' block rows."""
    b = len(slots)
    lens_t = torch.tensor(lens)
    if all(n == 1 for n in lens):  # a decode step: one token each
        positions = torch.tensor(starts)
        rows = cache.table_host[torch.tensor(slots)].long()
        blocks = rows[torch.arange(b), positions // cache.block_size]
    else:
        seq = torch.repeat_interleave(torch.arange(b), lens_t)
        first = torch.cumsum(lens_t, 0) - lens_t
        positions = torch.tensor(starts)[seq] + torch.arange(int(lens_t.sum())) - first[seq]
        rows = cache.table_host[torch.tensor(slots)].long()
        blocks = rows[seq, positions // cache.block_size]
    slot_mapping = blocks * cache.block_size + positions % cache.block_size
    return positions, slot_mapping, rows


def _gather_index(rows: torch.Tensor, ends: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pool indices of positions ``0..max(ends)`` of each row (past a row's end: the
    zero block), and which of them are real."""
    pos = torch.arange(int(ends.max()))
    idx = rows[:, pos // block_size] * block_size + pos % block_size
    valid = pos.unsqueeze(0) < ends.unsqueeze(1)
    return idx.masked_fill(~valid, 0), valid


class Backend:
    name = ""

    def build(self, cache, slots: list[int], starts: list[int], lens: list[int]) -> Step:
        raise NotImplementedError

    def store(self, step: Step, k_pool, v_pool, key, value) -> None:
        """Write the pass's new keys and values (``[1, kv_heads, T, dim]``) into the cache."""
        # [1, heads, T, dim] -> [T, heads, dim] rows of the pool
        k_pool.index_copy_(0, step.slot_mapping, key[0].transpose(0, 1).to(k_pool.dtype))
        v_pool.index_copy_(0, step.slot_mapping, value[0].transpose(0, 1).to(v_pool.dtype))

    def attend(self, step: Step, k_pool, v_pool, query, key, value, scale) -> torch.Tensor:
        raise NotImplementedError


def leading_decodes(lens: list[int]) -> int:
    """How many sequences at the front of the pass decode (one token each)."""
    n = 0
    while n < len(lens) and lens[n] == 1:
        n += 1
    return n


def bottom_right_causal(start: int, n: int) -> torch.Tensor:
    """Mask of ``n`` queries at positions ``start..start+n`` over keys ``0..start+n``."""
    pos = torch.arange(start + n)
    return pos.unsqueeze(0) <= (start + torch.arange(n)).unsqueeze(1)


class SdpaAttention(Backend):
    """SDPA over a pass: the decoding sequences as one batch, the query heads of each KV
    head grouped onto it (no KV repeated); each prefill chunk on its own, ``is_causal``
    over its fresh keys when it starts its sequence, else a bottom-right causal mask
    over its cached ones. Layouts say where the keys are (``decode``, ``cached``); the
    pass's ``data`` holds ``n_decode`` and ``prefill``: ``(offset, n, where, mask)``."""

    def decode(self, step: Step, k_cache, v_cache, q: torch.Tensor, scale) -> torch.Tensor:
        """``q`` ``[d, kv_heads, group, dim]`` of the decoding sequences -> their outputs."""
        raise NotImplementedError

    def cached(self, k_cache, v_cache, where) -> tuple[torch.Tensor, torch.Tensor]:
        """A continuing chunk's keys and values so far, ``[1, kv_heads, tokens, dim]``."""
        raise NotImplementedError

    def attend(self, step, k_cache, v_cache, query, key, value, scale):
        heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
        kv_heads = key.shape[1]
        group = heads // kv_heads
        out = query.new_empty(total, heads, dim)
        d = step.data["n_decode"]
        if d:
            q = query[0, :, :d].transpose(0, 1).reshape(d, kv_heads, group, dim)
            out[:d] = self.decode(step, k_cache, v_cache, q, scale).reshape(d, heads, dim)
        for off, n, where, mask in step.data["prefill"]:
            q = query[:, :, off: off + n]
            if mask is None:  # the sequence's first chunk: its own fresh keys, plain causal
                k, v = key[:, :, off: off + n], value[:, :, off: off + n]
            else:
                k, v = (t.to(q.dtype) for t in self.cached(k_cache, v_cache, where))
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
            out[off: off + n] = o[0].transpose(0, 1)
        return out


class SdpaBackend(SdpaAttention):
    """SDPA over the paged pool: each sequence's blocks gathered."""

    name = "sdpa"

    def build(self, cache, slots, starts, lens) -> Step:
        positions, slot_mapping, rows = _host_layout(cache, slots, starts, lens)
        dev = cache.device
        n_decode = leading_decodes(lens)
        data: dict = {"n_decode": n_decode, "prefill": []}
        if n_decode:
            ends = torch.tensor(starts[:n_decode]) + 1
            idx, valid = _gather_index(rows[:n_decode], ends, cache.block_size)
            data["decode_index"] = idx.to(dev)
            data["decode_mask"] = None if bool(valid.all()) else valid[:, None, None, :].to(dev)
        off = n_decode
        for j in range(n_decode, len(lens)):
            start, n = starts[j], lens[j]
            if start == 0:
                data["prefill"].append((off, n, None, None))
            else:
                idx, _ = _gather_index(rows[j: j + 1], torch.tensor([start + n]), cache.block_size)
                data["prefill"].append((off, n, idx[0].to(dev), bottom_right_causal(start, n).to(dev)))
            off += n
        return Step(cache, self, positions.to(dev), slot_mapping.to(dev), lens, starts, data)

    def decode(self, step, k_pool, v_pool, q, scale):
        idx = step.data["decode_index"]
        d, longest = idx.shape
        kv_heads, dim = q.shape[1], q.shape[3]
        k = k_pool.index_select(0, idx.view(-1)).view(d, longest, kv_heads, dim).transpose(1, 2)
        v = v_pool.index_select(0, idx.view(-1)).view(d, longest, kv_heads, dim).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=step.data["decode_mask"],
                                              scale=scale)

    def cached(self, k_pool, v_pool, idx):
        return (k_pool.index_select(0, idx).transpose(0, 1).unsqueeze(0),
                v_pool.index_select(0, idx).transpose(0, 1).unsqueeze(0))


class VarlenBackend(Backend):
    """torch's flash varlen kernel; ``paged``: through the block table, else over packed
    gathered keys."""

    def __init__(self, kernel: Callable, paged: bool):
        self.kernel = kernel
        self.paged = paged
        self.name = "paged" if paged else "varlen"

    def build(self, cache, slots, starts, lens) -> Step:
        positions, slot_mapping, rows = _host_layout(cache, slots, starts, lens)
        dev = cache.device
        lens_t = torch.tensor(lens, dtype=torch.int32)
        used = torch.tensor(starts, dtype=torch.int32) + lens_t
        cu_q = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_q[1:] = torch.cumsum(lens_t, 0)
        cu_k = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_k[1:] = torch.cumsum(used, 0)
        data = {"cu_q": cu_q.to(dev), "cu_k": cu_k.to(dev), "max_q": max(lens), "max_k": int(used.max())}
        if self.paged:
            data["used"] = used.to(dev)
            table = cache.sync_table()
            data["table"] = table.index_select(0, torch.tensor(slots, device=table.device))
        else:
            seq = torch.repeat_interleave(torch.arange(len(lens)), used.long())
            pos = torch.arange(int(used.sum())) - (cu_k[:-1].long())[seq]
            data["gather"] = (rows[seq, pos // cache.block_size] * cache.block_size
                              + pos % cache.block_size).to(dev)
        return Step(cache, self, positions.to(dev), slot_mapping.to(dev), lens, starts, data)

    def attend(self, step, k_pool, v_pool, query, key, value, scale):
        heads, kv_heads = query.shape[1], key.shape[1]
        q = query[0].transpose(0, 1).contiguous()  # [T, heads, dim]
        d = step.data
        if self.paged:
            bs = step.cache.block_size
            k = k_pool.view(-1, bs, kv_heads, k_pool.shape[-1])
            v = v_pool.view(-1, bs, kv_heads, v_pool.shape[-1])
            extra = {"seqused_k": d["used"], "block_table": d["table"]}
        else:
            k, v = k_pool.index_select(0, d["gather"]), v_pool.index_select(0, d["gather"])
            extra = {}
        return self.kernel(q, k, v, d["cu_q"], d["cu_k"], d["max_q"], d["max_k"], scale=scale, window_size=(-1, 0),
                           enable_gqa=heads != kv_heads, **extra)


# -- the kernel's contract, in plain torch -------------------------------------------


def varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, seqused_k=None, block_table=None):
    """What ``torch.nn.attention.varlen.varlen_attn`` computes (flash attention's
    varlen contract): sequence b's queries ``cu_seq_q[b]:cu_seq_q[b+1]`` attend to its
    keys (``cu_seq_k`` ranges, or with ``block_table`` its blocks of the paged pool
    ``[blocks, block_size, kv_heads, dim]``, ``seqused_k[b]`` of them used); causal
    (``window_size=(-1, 0)``) aligns the last query with the last key."""
    out = torch.empty_like(query)
    for b in range(cu_seq_q.numel() - 1):
        q0, q1 = int(cu_seq_q[b]), int(cu_seq_q[b + 1])
        if block_table is not None:
            n = int(seqused_k[b])
            bs = key.shape[1]
            blocks = block_table[b, : -(-n // bs)].long()
            k = key[blocks].reshape(-1, *key.shape[2:])[:n]
            v = value[blocks].reshape(-1, *value.shape[2:])[:n]
        else:
            k0, k1 = int(cu_seq_k[b]), int(cu_seq_k[b + 1])
            if seqused_k is not None:
                k1 = k0 + int(seqused_k[b])
            k, v = key[k0:k1], value[k0:k1]
        q = query[q0:q1].transpose(0, 1)  # [heads, lq, dim]
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        if enable_gqa and k.shape[0] != q.shape[0]:
            k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
            v = v.repeat_interleave(q.shape[0] // v.shape[0], 0)
        mask = None
        if tuple(window_size) == (-1, 0):
            lq, lk = q.shape[1], k.shape[1]
            mask = torch.arange(lk).unsqueeze(0) <= (torch.arange(lq) + lk - lq).unsqueeze(1)
        out[q0:q1] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    return out


# -- choosing a backend ----------------------------------------------------------------


def torch_varlen_kernel(paged: bool) -> Callable | None:
    """torch's ``varlen_attn`` if this torch has it (and, for ``paged``, its block table)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    needed = {"window_size", "enable_gqa"} | ({"block_table", "seqused_k"} if paged else set())
    return varlen_attn if needed <= set(params) else None


@torch.inference_mode()
def probe(backend: Backend, make_cache: Callable, heads: int, dtype: torch.dtype) -> str | None:
    """Run ``backend`` and ``sdpa`` on the same small random problem (two sequences,
    one continuing from a cached prefix and one decoding); None if they agree, else why not."""
    try:
        cache = make_cache()
        ref_cache = make_cache()
        g = torch.Generator().manual_seed(0)
        kv_heads, dim = cache.shape_tail
        slots, prior, lens = [0, 1], [cache.block_size + 5, 3], [7, 1]
        for c in (cache, ref_cache):
            for s, p, n in zip(slots, prior, lens):
                c.open(s, p + n)
        outs = []
        for c, backend_ in ((cache, backend), (ref_cache, SdpaBackend())):
            g.manual_seed(0)
            c.prepare(slots, [p + n for p, n in zip(prior, lens)])
            for s, p in zip(slots, prior):  # the cached prefix
                idx = c.token_slots(s, 0, p).to(c.device)
                for t in c.keys + c.values:
                    t.index_copy_(0, idx, torch.randn(p, kv_heads, dim, generator=g).to(t.device, t.dtype))
            total = sum(lens)
            q = torch.randn(1, heads, total, dim, generator=g).to(c.device, dtype)
            k = torch.randn(1, kv_heads, total, dim, generator=g).to(c.device, dtype)
            v = torch.randn(1, kv_heads, total, dim, generator=g).to(c.device, dtype)
            step = backend_.build(c, slots, prior, lens)
            outs.append(step.attend(0, q, k, v, dim ** -0.5).float())
        err = (outs[0] - outs[1]).abs().max().item()
        return None if err < 2e-2 else f"differs from sdpa by {err:.3g}"
    except Exception as exc:  # noqa: BLE001 - any failure means: not this backend
        return f"{type(exc).__name__}: {exc}"


def choose(device: torch.device, make_cache: Callable, heads: int, dtype: torch.dtype,
           forced: str | None = None) -> Backend:
    """``sdpa`` on CPU; on CUDA the first of ``paged``, ``varlen`` that passes ``probe``
    (``forced``, from ``INFERSTACK_ATTENTION``: only that one, else ``sdpa``)."""
    if device.type != "cuda" or forced == "sdpa":
        return SdpaBackend()
    for paged in (True, False):
        kernel = torch_varlen_kernel(paged)
        backend = VarlenBackend(kernel, paged) if kernel else None
        if backend is None or (forced and backend.name != forced):
            continue
        problem = probe(backend, make_cache, heads, dtype)
        if problem is None:
            return backend
        log.warning("attention backend %s unusable here: %s", backend.name, problem)
    log.warning("no flash varlen kernel usable on %s: attention runs through SDPA over gathered blocks", device)
    return SdpaBackend()

