"""Tensor parallelism against one device: the text engine in-process on TP=1 and on
TP=N ranks (this process leads as rank 0; ranks 1..N-1 are follower processes of this
same script), the same chat prompts, greedy, ``ignore_eos``, a fixed output length;
decode throughput and the time of the first step per batch size, and whether the
text equals TP=1's.

    python -m loadtest.tp --tp 1,2 --batch 1,8,32 --max-tokens 64          # SmolLM2-135M on this CPU
    python -m loadtest.tp --build-random qwen3-14b --out-dir /tmp/q14 --tokenizer-from DIR --device cuda
    python -m loadtest.tp --model-dir /tmp/q14 --device cuda --tp 1,2 --batch 1,8,32,64

On a CPU the cores are split between the ranks (``--threads`` is the total): TP=1
uses all of them, TP=2 half each, so the comparison is at equal compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from loadtest.prompts import chat_prompt

QWEN3_14B = dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
"""Qwen/Qwen3-14B's config.json (the vocabulary is the tokenizer's: see ``build_random``)."""


def build_random(name: str, out_dir: Path, tokenizer_from: Path, device: str) -> None:
    """A random-weight checkpoint with a real model's shapes (speed does not depend on
    the weights' values) and a small tokenizer copied from a local model. The vocabulary
    is the tokenizer's (49,152 for SmolLM2's, against Qwen3's 151,936: 1 GB less of
    embeddings and lm_head out of 28 GB), so every sampled id decodes."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    assert name == "qwen3-14b", "only qwen3-14b is described here"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    config = Qwen3Config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         architectures=["Qwen3ForCausalLM"], dtype="bfloat16", **QWEN3_14B)
    started = time.perf_counter()
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B random parameters in {out_dir} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)


def model_dir_of(args) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    from gpu_worker.settings import WorkerSettings
    from inferstack import modelstore
    from inferstack.registry import Registry

    settings = WorkerSettings()
    return modelstore.resolve(Registry.load(settings.models_file)[args.model], settings.cache_dir)


def spec_for(model_dir: Path, max_batch: int):
    from inferstack.registry import Modality, ModelSpec

    return ModelSpec(name="bench", modality=Modality.TEXT, path=str(model_dir), max_batch=max_batch,
                     memory_gb=0.0)


def dtype_for(name: str, device: torch.device) -> torch.dtype:
    from gpu_worker.precision import choose_dtype

    return choose_dtype(device, name).dtype


def follower(args) -> int:
    """Ranks 1..N-1: load the shard, replay rank 0's steps."""
    from gpu_worker.text.engine import make_runner
    from gpu_worker.text.tp import TpGroup, TpRank, follow

    device = torch.device(args.device if args.device != "cuda" else f"cuda:{args.rank}")
    torch.set_num_threads(args.threads)
    group = TpGroup(TpRank(args.rank, args.world), args.master, device, timeout_s=600)
    model_dir = model_dir_of(args)
    runner = make_runner(spec_for(model_dir, max(args.batches)), model_dir, device=device,
                         dtype=dtype_for(args.dtype, device), tp=group.tp)
    try:
        follow(runner, group)
    finally:
        group.close()
    return 0


def run_engine(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, list[list[int]]]:
    """All prompts at once; returns (first step's seconds, total seconds, outputs)."""
    from broker.messages import GenerateRequest, SamplingParams
    from scheduler.queue import Claimed

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    done: set[str] = set()

    def emit(batch):
        for o in batch:
            if o.event is not None:
                outputs.setdefault(o.request_id, []).extend(o.event.token_ids)
            if o.request_done:
                done.add(o.request_id)

    for i, p in enumerate(prompts):
        engine.add(Claimed(GenerateRequest(id=f"b{i}", model="bench", prompt_token_ids=p, reply_to="x",
                                           params=params), 1), [])
    started = time.perf_counter()
    engine.step(emit)
    first = time.perf_counter() - started
    while len(done) < len(prompts):
        engine.step(emit)
    return first, time.perf_counter() - started, [outputs[f"b{i}"] for i in range(len(prompts))]


def measure(args, tp: int, model_dir: Path) -> list[dict]:
    from gpu_worker.text.engine import TextEngine
    from gpu_worker.text.tp import TpGroup, TpRank
    from inferstack.redis_server import free_port

    device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    threads = max(1, args.threads // tp) if device.type == "cpu" else args.threads
    torch.set_num_threads(threads)
    followers, group = [], None
    if tp > 1:
        master = f"127.0.0.1:{free_port()}"
        followers = [subprocess.Popen([sys.executable, "-m", "loadtest.tp", "--follower", "--rank", str(r),
                                       "--world", str(tp), "--master", master, "--model-dir", str(model_dir),
                                       "--device", args.device, "--dtype", args.dtype, "--threads", str(threads),
                                       "--batch", ",".join(map(str, args.batches))]) for r in range(1, tp)]
        group = TpGroup(TpRank(0, tp), master, device, timeout_s=600)
    dtype = dtype_for(args.dtype, device)
    engine = TextEngine(spec_for(model_dir, max(args.batches)), model_dir, device=device, dtype=dtype,
                        max_seqs=max(args.batches), max_prefill_tokens=1 << 16, tp_group=group)
    tok = engine.tokenizer
    prompts = [tok(tok.apply_chat_template(chat_prompt(i), tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for i in range(max(args.batches))]
    rows = []
    try:
        run_engine(engine, prompts[:2], 4)  # warm-up
        for batch in args.batches:
            first, total, outputs = run_engine(engine, prompts[:batch], args.max_tokens)
            decode_s = total - first
            rows.append({"tp": tp, "threads_per_rank": threads, "batch": batch, "device": str(device),
                         "dtype": str(dtype).removeprefix("torch."), "first_step_s": round(first, 4),
                         "total_s": round(total, 3),
                         "decode_tok_s": round(batch * (args.max_tokens - 1) / decode_s, 2),
                         "tok_s": round(batch * args.max_tokens / total, 2), "outputs": outputs})
            print(f"tp={tp} batch={batch}: {rows[-1]['decode_tok_s']} decode tok/s, first step "
                  f"{first * 1000:.0f} ms", flush=True)
    finally:
        engine.close()
        for p in followers:
            p.wait(120)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.tp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="registry name (default smollm2-135m)")
    ap.add_argument("--model-dir", help="a local checkpoint instead of a registry model")
    ap.add_argument("--tp", default="1,2", help="group sizes to compare (default 1,2)")
    ap.add_argument("--batch", default="1,8,32", help="batch sizes (default 1,8,32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (rank r on cuda:r)")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads in all (split between ranks)")
    ap.add_argument("--out", default="loadtest/results/tp.json")
    ap.add_argument("--build-random", help="write a random-weight checkpoint of this model (qwen3-14b) and exit")
    ap.add_argument("--out-dir", help="with --build-random: where")
    ap.add_argument("--tokenizer-from", help="with --build-random: a local model whose tokenizer to use")
    ap.add_argument("--follower", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",")]
    if args.build_random:
        build_random(args.build_random, Path(args.out_dir), Path(args.tokenizer_from), args.device)
        return 0
    if args.follower:
        return follower(args)
    model_dir = model_dir_of(args)
    rows = []
    for tp in [int(t) for t in args.tp.split(",")]:
        rows += measure(args, tp, model_dir)
    base = {r["batch"]: r for r in rows if r["tp"] == 1}
    print(f"\n{'tp':>3} {'batch':>5} {'decode tok/s':>13} {'vs tp=1':>8} {'first step ms':>14} {'same text':>10}")
    for r in rows:
        ref = base.get(r["batch"])
        r["vs_tp1"] = round(r["decode_tok_s"] / ref["decode_tok_s"], 3) if ref else None
        r["same_text_as_tp1"] = (r["outputs"] == ref["outputs"]) if ref else None
        print(f"{r['tp']:>3} {r['batch']:>5} {r['decode_tok_s']:>13} {r['vs_tp1'] or '-':>8} "
              f"{r['first_step_s'] * 1000:>14.0f} {str(r['same_text_as_tp1']):>10}")
    for r in rows:
        del r["outputs"]
    report = {"command": " ".join(["python -m loadtest.tp", *(argv if argv is not None else sys.argv[1:])]),
              "model": args.model_dir or args.model, "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
