"""The raw-engine reference: the same model in-process with ``model.generate`` on
static left-padded batches, greedy, fixed output length. What the stack is compared to."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from loadtest.prompts import chat_prompt


@dataclass
class RawResult:
    batch: int
    tokens_per_s: float
    prefill_s: float
    """One batch's prefill alone (the TTFT floor)."""
    total_s: float


def stack_precision(model: str):
    """Where and in which dtype this host's worker runs ``model`` (same registry, same
    ``INFERSTACK_*`` environment, same hardware rule), so that the reference matches it.
    Returns (model_dir, device, DtypeChoice)."""
    from gpu_worker.precision import choose_dtype
    from gpu_worker.settings import WorkerSettings
    from gpu_worker.worker import pick_device
    from inferstack import modelstore
    from inferstack.registry import Registry

    settings = WorkerSettings()
    spec = Registry.load(settings.models_file)[model]
    device = pick_device(settings.device)
    return modelstore.resolve(spec, settings.cache_dir), device, choose_dtype(device, spec.dtype, settings.dtype)


def load(model_dir: str, dtype=torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return tok, model


@torch.inference_mode()
def run_batch(tok, model, batch: int, max_tokens: int, offset: int = 0, repeats: int = 1) -> RawResult:
    texts = [tok.apply_chat_template(chat_prompt(offset + i), tokenize=False, add_generation_prompt=True)
             for i in range(batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    model.generate(**enc, max_new_tokens=2, do_sample=False)  # warm-up
    started = time.perf_counter()
    model(**enc)
    prefill_s = time.perf_counter() - started
    total = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        total += time.perf_counter() - started
        assert out.shape[1] - enc["input_ids"].shape[1] == max_tokens
    return RawResult(batch, batch * max_tokens * repeats / total, prefill_s, total / repeats)
