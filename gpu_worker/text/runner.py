"""The only part of the text engine that touches torch models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gpu_worker.text.kvcache import Layers, SlotKVCache, cache_kwarg

log = logging.getLogger(__name__)

MIN_KV_BUDGET = 256 << 20


def column_major_linears(model: torch.nn.Module) -> None:
    """Store every Linear weight transposed-contiguous (column-major), keeping its
    shape. ``F.linear(x, W)`` then runs as ``x @ W.T`` on a contiguous matrix, which
    MKL's sgemm does 2-2.5x faster for the skinny batches of decoding (8-64 rows) on
    CPU; the values and results are unchanged. Tied weights stay tied. Only for fp32:
    bf16 matmuls go through oneDNN, not sgemm, and were not measured faster so."""
    replaced: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w = module.weight
            if id(w) not in replaced:
                if isinstance(module, torch.nn.Embedding) and not any(
                    m.weight is w for m in model.modules() if isinstance(m, torch.nn.Linear)
                ):
                    continue  # an untied embedding is only gathered from: keep it row-major
                replaced[id(w)] = torch.nn.Parameter(w.detach().t().contiguous().t(), requires_grad=False)
            module.weight = replaced[id(w)]


class ModelRunner:
    def __init__(self, model_dir: Path | str, *, device: torch.device, dtype: torch.dtype, max_slots: int,
                 context_length: int | None = None, kv_cache_bytes: int | None = None,
                 memory_bytes: int | None = None, tp=None):
        """``kv_cache_bytes`` bounds the batch KV cache; by default it is what the
        model's registry memory estimate (``memory_bytes``) leaves beside the weights,
        so the model manager's accounting holds. ``tp`` (a ``tp.TpRank``, its process
        group joined): keep only this rank's shard of the model and of the KV cache;
        the budget then counts the whole group, and every rank admits the same tokens."""
        from transformers import AutoModelForCausalLM

        self.device, self.dtype = device, dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation="sdpa"
        ).eval()
        cfg = self.model.config.get_text_config()
        self.config = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.group_token_bytes = SlotKVCache.token_bytes(cfg.num_hidden_layers, kv_heads, head_dim, dtype)
        """KV bytes per token over all ranks (this rank's cache holds only its heads)."""
        if tp is not None:
            from gpu_worker.text.tp import shard_model

            kv_heads = shard_model(self.model, tp)  # on the host, before the device holds anything
        self.model.to(device)
        if device.type == "cpu" and dtype == torch.float32:
            column_major_linears(self.model)
        self._cache_kwarg = cache_kwarg(self.model)
        self._decoder = self.model.get_decoder()
        self._decoder_cache_kwarg = cache_kwarg(self._decoder)
        self.context_length = context_length or getattr(cfg, "max_position_embeddings", 4096)
        budget = kv_cache_bytes if kv_cache_bytes is not None else self._default_budget(memory_bytes, weights)
        token_bytes = SlotKVCache.token_bytes(cfg.num_hidden_layers, kv_heads, head_dim, dtype)
        self.cache = SlotKVCache(
            cfg.num_hidden_layers, max_slots, kv_heads, head_dim,
            dtype=dtype, device=device, max_len=self.context_length,
            budget_bytes=budget // self.group_token_bytes * token_bytes,  # whole tokens: the same on every rank
        )
        self._additive_mask = self.model.config._attn_implementation != "sdpa"

    def _default_budget(self, memory_bytes: int | None, weights: int) -> int:
        if memory_bytes:
            return max(memory_bytes - weights, MIN_KV_BUDGET)
        if self.device.type == "cuda":  # no estimate: half of what is free now
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(free // 2, MIN_KV_BUDGET)
        import psutil

        return max(psutil.virtual_memory().available // 4, MIN_KV_BUDGET)

    @torch.inference_mode()
    def forward(self, first_row: int, chunks: list[list[int]], starts: list[int], used_rows: int,
                used_len: int, *, logits: bool = True) -> torch.Tensor | None:
        """Run ``chunks[j]`` for cache row ``first_row + j``, whose first ``starts[j]``
        tokens are already cached. Returns the logits after each chunk's last token
        (``logits=False``: only fill the cache, as tensor-parallel followers do).
        ``used_rows``/``used_len``: what is in use over all rows (kept if the cache grows)."""
        m = len(chunks)
        query_len = max(len(c) for c in chunks)
        lens = torch.tensor([len(c) for c in chunks], device=self.device)
        start_t = torch.tensor(starts, device=self.device)
        ends = start_t + lens
        kv_len = int(max(s + query_len for s in starts))
        self.cache.ensure(first_row + m, kv_len, used_rows, used_len)

        ids = torch.zeros(m, query_len, dtype=torch.long)
        for j, c in enumerate(chunks):
            ids[j, : len(c)] = torch.tensor(c, dtype=torch.long)  # right-padded
        ids = ids.to(self.device)
        offsets = torch.arange(query_len, device=self.device)
        positions = start_t.unsqueeze(1) + offsets.unsqueeze(0)  # [m, L]
        cols = torch.arange(kv_len, device=self.device)
        # Row j, query i sees columns <= its own position and none past the row's data;
        # padded queries (i >= len) see their prefix too, so no row is fully masked.
        mask = (cols.view(1, 1, -1) <= positions.unsqueeze(-1)) & (cols.view(1, 1, -1) < ends.view(-1, 1, 1).clamp(min=1))
        mask = mask | ((offsets.view(1, -1, 1) >= lens.view(-1, 1, 1)) & (cols.view(1, 1, -1) == 0))
        mask = mask.unsqueeze(1)  # [m, 1, L, kv_len]
        if self._additive_mask:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min
            )
        self.cache.plan(first_row, start_t, query_len, kv_len)
        if not logits:
            self._decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                          **{self._decoder_cache_kwarg: self.cache}, use_cache=True)
            return None
        keep = (lens - 1).unsqueeze(1)  # [m, 1]: position of each chunk's last token
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            **{self._cache_kwarg: self.cache}, use_cache=True, logits_to_keep=keep,
        )
        return out.logits[:, -1, :]

    # -- KV to and from the DRAM store (``key`` names the entry; tensor-parallel ranks
    # each keep their own shard of it: ``tp.MIRRORED_RUNNER_OPS``) -----------------------

    def save_kv(self, key: str, row: int, length: int) -> Layers:
        """A copy of a row's first ``length`` positions, to keep under ``key``."""
        return self.cache.to_layers(row, length)

    def restore_kv(self, key: str, row: int, layers: Layers, length: int) -> None:
        """Write the entry ``key`` (its ``layers``) into a row's first ``length`` positions."""
        self.cache.from_layers(row, layers, length)

    def drop_kv(self, key: str) -> None:
        """The store dropped ``key`` (evicted, replaced or refused)."""
