"""The only part of the text engine that touches torch models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gpu_worker.text import attention
from gpu_worker.text.graphs import DecodeGraphs, default_sizes
from gpu_worker.text.kvcache import Layers, PagedKVCache
from gpu_worker.text.slotcache import SlotAttention, SlotKVCache

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
                 memory_bytes: int | None = None, tp=None, block_size: int | None = None, attention_backend: str = "auto",
                 cuda_graphs: bool = True):
        """``kv_cache_bytes`` bounds the paged KV cache; by default it is what the
        model's registry memory estimate (``memory_bytes``) leaves beside the weights,
        so the model manager's accounting holds. ``tp`` (a ``tp.TpRank``, its process
        group joined): keep only this rank's shard of the model and of the KV cache;
        the budget then counts the whole group, and every rank admits the same tokens.
        ``block_size``: tokens per KV block (default 256 on CUDA, as FlashAttention-2's
        paged kernel needs, else 64); ``attention_backend``: ``auto`` (``slots`` on
        CPU, the paged cache elsewhere), ``slots`` (``slotcache``) or a paged backend
        (``attention.choose``); ``cuda_graphs``: decode from CUDA graphs where the
        backend allows."""
        from transformers import AutoModelForCausalLM

        self.device, self.dtype = device, dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attention.register()
        ).eval()
        cfg = self.model.config.get_text_config()
        self.config = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        group = cfg.num_attention_heads // kv_heads
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.group_token_bytes = PagedKVCache.token_bytes(cfg.num_hidden_layers, kv_heads, head_dim, dtype)
        """KV bytes per token over all ranks (this rank's cache holds only its heads)."""
        if tp is not None:
            from gpu_worker.text.tp import shard_model

            kv_heads = shard_model(self.model, tp)  # on the host, before the device holds anything
        self.model.to(device)
        if device.type == "cpu" and dtype == torch.float32:
            column_major_linears(self.model)
        self._decoder = self.model.get_decoder()
        self.context_length = context_length or getattr(cfg, "max_position_embeddings", 4096)
        budget = kv_cache_bytes if kv_cache_bytes is not None else self._default_budget(memory_bytes, weights)
        token_bytes = PagedKVCache.token_bytes(cfg.num_hidden_layers, kv_heads, head_dim, dtype)
        block_size = block_size or (256 if device.type == "cuda" else 64)

        def make_cache(slots: int = max_slots, budget: int | None = None, max_len: int = self.context_length):
            return PagedKVCache(cfg.num_hidden_layers, slots, kv_heads, head_dim, dtype=dtype, device=device,
                                max_len=max_len, block_size=block_size, budget_bytes=budget)

        # Whole tokens of the group's budget: every rank holds the same number of tokens.
        rank_budget = budget // self.group_token_bytes * token_bytes
        if attention_backend == "slots" or (attention_backend == "auto" and device.type != "cuda"):
            self.cache = SlotKVCache(cfg.num_hidden_layers, max_slots, kv_heads, head_dim, dtype=dtype,
                                     device=device, max_len=self.context_length, budget_bytes=rank_budget)
            self.backend = SlotAttention()
        else:
            self.cache = make_cache(budget=rank_budget)
            self.backend = attention.choose(device, lambda: make_cache(2, None, 4 * block_size), kv_heads * group,
                                            dtype, forced=None if attention_backend == "auto" else attention_backend)
        log.info("KV cache: %s (%.0f MiB budget); attention: %s on %s", self.cache.describe(), rank_budget / 2**20,
                 self.backend.name, device)
        self.graphs: DecodeGraphs | None = None
        # Not under tensor parallelism: the all-reduces between ranks stay outside graphs.
        if device.type == "cuda" and cuda_graphs and self.backend.name == "paged" and tp is None:
            try:
                self.graphs = DecodeGraphs(self, default_sizes(max_slots))
                self.graphs.capture_all()
                log.info("CUDA graphs captured for decode batches of %s", self.graphs.sizes)
            except Exception:  # noqa: BLE001 - eager decoding is slower, never wrong
                log.warning("CUDA graph capture failed: decoding eagerly", exc_info=True)
                self.graphs = None

    def _default_budget(self, memory_bytes: int | None, weights: int) -> int:
        if memory_bytes:
            return max(memory_bytes - weights, MIN_KV_BUDGET)
        if self.device.type == "cuda":  # no estimate: half of what is free now
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(free // 2, MIN_KV_BUDGET)
        import psutil

        return max(psutil.virtual_memory().available // 4, MIN_KV_BUDGET)

    @torch.inference_mode()
    def forward(self, slots: list[int], chunks: list[list[int]], starts: list[int],
                logit_rows: list[int] | None = None, *, logits: bool = True) -> torch.Tensor | None:
        """Run ``chunks[j]`` for the sequence in cache slot ``slots[j]``, whose first
        ``starts[j]`` tokens are cached, all in one packed pass. Returns the logits after
        the last token of each chunk in ``logit_rows`` (default: every chunk), in order
        (``logits=False``: only fill the cache, as tensor-parallel followers do)."""
        lens = [len(c) for c in chunks]
        self.cache.prepare(slots, [s + n for s, n in zip(starts, lens)])
        rows = range(len(chunks)) if logit_rows is None else logit_rows
        if self.graphs is not None and all(n == 1 for n in lens) and self.graphs.fits(len(slots)):
            out = self.graphs.run(slots, [c[0] for c in chunks], starts)
            return out if logit_rows is None else out[list(rows)]
        step = self.backend.build(self.cache, slots, starts, lens)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long).to(self.device)
        if not logits:
            self._decoder(input_ids=ids.unsqueeze(0), position_ids=step.positions.unsqueeze(0), use_cache=False,
                          **{attention.STEP_KWARG: step})
            return None
        ends = torch.tensor(lens).cumsum(0) - 1
        keep = ends if logit_rows is None else ends[list(rows)]
        return self.run_model(ids, step.positions, step, keep.to(self.device))

    def run_model(self, ids: torch.Tensor, positions: torch.Tensor, step, keep: torch.Tensor | None) -> torch.Tensor:
        """The model over one packed row of tokens; logits at ``keep`` (None: every token)."""
        out = self.model(input_ids=ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                         logits_to_keep=0 if keep is None else keep, **{attention.STEP_KWARG: step})
        return out.logits[0]

    # -- KV to and from the DRAM store (``key`` names the entry; tensor-parallel ranks
    # each keep their own shard of it: ``tp.MIRRORED_RUNNER_OPS``) -----------------------

    def save_kv(self, key: str, slot: int, length: int) -> Layers:
        """A copy of a slot's first ``length`` positions, to keep under ``key``."""
        return self.cache.to_layers(slot, length)

    def restore_kv(self, key: str, slot: int, layers: Layers, length: int) -> None:
        """Write the entry ``key`` (its ``layers``) into a slot's first ``length`` positions."""
        self.cache.from_layers(slot, layers, length)

    def drop_kv(self, key: str) -> None:
        """The store dropped ``key`` (evicted, replaced or refused)."""
