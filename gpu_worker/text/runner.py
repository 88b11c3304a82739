"""The only part of the text engine that touches torch models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gpu_worker.text import attention
from gpu_worker.text.graphs import DecodeGraphs, default_sizes
from gpu_worker.text.kvcache import Layers, PagedKVCache

log = logging.getLogger(__name__)

MIN_KV_BUDGET = 256 << 20

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # float64: exact arithmetic, for tests that compare token for token


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def column_major_linears(model: torch.nn.Module) -> None:
    """Store every Linear weight transposed-contiguous (column-major), keeping its
    shape. ``F.linear(x, W)`` then runs as ``x @ W.T`` on a contiguous matrix, which
    MKL's sgemm does 2-2.5x faster for the skinny batches of decoding (8-64 rows) on
    CPU; the values and results are unchanged. Tied weights stay tied."""
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
                 memory_bytes: int | None = None, block_size: int | None = None, cuda_graphs: bool = True):
        """``kv_cache_bytes`` bounds the paged KV cache; by default it is what the
        model's registry memory estimate (``memory_bytes``) leaves beside the weights,
        so the model manager's accounting holds. ``block_size``: tokens per KV block
        (default 256 on CUDA, as FlashAttention-2's paged kernel needs, else 64)."""
        from transformers import AutoModelForCausalLM

        self.device, self.dtype = device, dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attention.register()
        ).to(device).eval()
        if device.type == "cpu" and dtype == torch.float32:
            column_major_linears(self.model)
        cfg = self.model.config.get_text_config()
        self.config = cfg
        self.context_length = context_length or getattr(cfg, "max_position_embeddings", 4096)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        block_size = block_size or (256 if device.type == "cuda" else 64)

        def make_cache(slots: int = max_slots, budget: int | None = None, max_len: int = self.context_length):
            return PagedKVCache(cfg.num_hidden_layers, slots, kv_heads, head_dim, dtype=dtype, device=device,
                                max_len=max_len, block_size=block_size, budget_bytes=budget)

        self.cache = make_cache(budget=kv_cache_bytes if kv_cache_bytes is not None
                                else self._default_budget(memory_bytes))
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB)", self.cache.num_blocks, block_size,
                 self.cache.num_blocks * block_size * self.cache.bytes_per_token / 2**20)
        self.backend = attention.choose(device, lambda: make_cache(2, None, 4 * block_size), cfg.num_attention_heads,
                                        dtype)
        log.info("attention: %s on %s", self.backend.name, device)
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and cuda_graphs and self.backend.name == "paged":
            try:
                self.graphs = DecodeGraphs(self, default_sizes(max_slots))
                self.graphs.capture_all()
                log.info("CUDA graphs captured for decode batches of %s", self.graphs.sizes)
            except Exception:  # noqa: BLE001 - eager decoding is slower, never wrong
                log.warning("CUDA graph capture failed: decoding eagerly", exc_info=True)
                self.graphs = None

    def _default_budget(self, memory_bytes: int | None) -> int:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if memory_bytes:
            return max(memory_bytes - weights, MIN_KV_BUDGET)
        if self.device.type == "cuda":  # no estimate: half of what is free now
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(free // 2, MIN_KV_BUDGET)
        import psutil

        return max(psutil.virtual_memory().available // 4, MIN_KV_BUDGET)

    @torch.inference_mode()
    def forward(self, slots: list[int], chunks: list[list[int]], starts: list[int],
                logit_rows: list[int] | None = None) -> torch.Tensor:
        """Run ``chunks[j]`` for the sequence in cache slot ``slots[j]``, whose first
        ``starts[j]`` tokens are cached, all in one packed pass. Returns the logits after
        the last token of each chunk in ``logit_rows`` (default: every chunk), in order."""
        lens = [len(c) for c in chunks]
        self.cache.prepare(slots, [s + n for s, n in zip(starts, lens)])
        rows = range(len(chunks)) if logit_rows is None else logit_rows
        if self.graphs is not None and all(n == 1 for n in lens) and self.graphs.fits(len(slots)):
            logits = self.graphs.run(slots, [c[0] for c in chunks], starts)
            return logits if logit_rows is None else logits[list(rows)]
        step = self.backend.build(self.cache, slots, starts, lens)
        ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long).to(self.device)
        ends = torch.tensor(lens).cumsum(0) - 1
        keep = ends if logit_rows is None else ends[list(rows)]
        return self.run_model(ids, step.positions, step, keep.to(self.device))

    def run_model(self, ids: torch.Tensor, positions: torch.Tensor, step, keep: torch.Tensor | None) -> torch.Tensor:
        """The model over one packed row of tokens; logits at ``keep`` (None: every token)."""
        out = self.model(input_ids=ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
                         logits_to_keep=0 if keep is None else keep, **{attention.STEP_KWARG: step})
        return out.logits[0]

    # -- KV to and from the DRAM store -----------------------------------------------

    def save_kv(self, key: str, slot: int, length: int) -> Layers:
        """A copy of a slot's first ``length`` positions, to keep under ``key``."""
        return self.cache.to_layers(slot, length)

    def restore_kv(self, key: str, slot: int, layers: Layers, length: int) -> None:
        """Write the entry ``key`` (its ``layers``) into a slot's first ``length`` positions."""
        self.cache.from_layers(slot, layers, length)
