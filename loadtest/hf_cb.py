"""transformers' own continuous batching (``model.generate_batch``, paged attention)
on the same model, prompts and output length, for comparison with our engine.

    python -m loadtest.hf_cb --batch 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run(model_dir: str, batch: int, max_tokens: int, attn: str = "paged|sdpa", dtype=torch.float32) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from loadtest.prompts import chat_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).eval()
    inputs = [tok(tok.apply_chat_template(chat_prompt(i), tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"] for i in range(batch)]
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    model.generate_batch(inputs=inputs[:2], generation_config=GenerationConfig(
        max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id))  # warm-up
    started = time.perf_counter()
    out = model.generate_batch(inputs=inputs, generation_config=cfg)
    wall = time.perf_counter() - started
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "attn": attn}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)
    from loadtest.raw import stack_precision

    model_dir, _, precision = stack_precision(args.model)
    print(json.dumps({**run(str(model_dir), args.batch, args.max_tokens, dtype=precision.dtype),
                      "dtype": precision.name}))


if __name__ == "__main__":
    main()
