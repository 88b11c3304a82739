"""In-process micro-benchmark of the text engine's step, without Redis or the API:

    python -m loadtest.engine_bench --concurrency 1,32 --max-tokens 64 --raw --hf-cb
    python -m loadtest.engine_bench --dtype float32 --concurrency 32 --profile

C closed-loop "clients" (greedy, ``ignore_eos``, fixed ``max_tokens``, the benchmark
prompts) keep C requests in the engine: as one finishes the next is added before the
following step, as the claimer would. Reports output tokens/s, the mean step time,
the mean inter-token time, and the process's CPU time per output token (a number a
busy shared machine disturbs less than wall time). ``--raw`` runs the raw static
``model.generate`` batch of the same size in the same process and dtype for the
ratio; ``--hf-cb`` transformers' own continuous batching (``loadtest.hf_cb``) at the
largest level. ``--profile`` prints torch's profiler table for a few steps. Use it to
iterate on step cost; the stack's numbers come from ``loadtest.bench`` /
``loadtest.suite``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass

import torch

MODEL = "smollm2-135m"


@dataclass
class EngineResult:
    concurrency: int
    requests: int
    tokens_per_s: float
    step_ms: float
    """Mean engine step (a decode step, or a step with a prefill in it)."""
    itl_ms: float
    """Mean time between one request's tokens (c=1: the decode step)."""
    wall_s: float
    steps: int
    cpu_ms_per_token: float
    """Process CPU time (all threads) per output token."""


def build_engine(model: str, dtype: torch.dtype, device: torch.device, max_seqs: int, static: bool = False,
                 attention: str | None = None):
    """``attention``: ``INFERSTACK_ATTENTION`` for this engine (None: the settings')."""
    from gpu_worker.settings import WorkerSettings
    from gpu_worker.text.engine import TextEngine
    from inferstack import modelstore
    from inferstack.registry import Registry

    settings = WorkerSettings()
    spec = Registry.load(settings.models_file)[model]
    model_dir = modelstore.resolve(spec, settings.cache_dir)
    options = getattr(settings, "runner_options", None)  # None: a branch before the paged cache (its own engine)
    if attention:
        options = (options or {}) | {"attention_backend": attention}
    kw = {} if options is None else {"runner_options": options}
    return TextEngine(spec, model_dir, device=device, dtype=dtype, max_seqs=max_seqs, static=static, **kw), model_dir


def prompts(engine, n: int) -> list[list[int]]:
    from loadtest.prompts import chat_prompt

    tok = engine.tokenizer
    return [tok.apply_chat_template(chat_prompt(i), add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(n)]


def run(engine, concurrency: int, max_tokens: int, requests_per_client: int) -> EngineResult:
    from broker.messages import GenerateRequest, SamplingParams
    from broker.messages import Claimed

    total = concurrency * requests_per_client
    ids = prompts(engine, total)
    sent = 0
    finished: dict[str, float] = {}
    token_times: dict[str, list[float]] = {}

    def submit():
        nonlocal sent
        req = GenerateRequest(id=f"b{sent}", model=engine.model, prompt_token_ids=ids[sent], reply_to="bench",
                              params=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        engine.add(Claimed(req, 1), [])
        sent += 1

    def emit(batch):
        now = time.perf_counter()
        for o in batch:
            if o.event is not None and getattr(o.event, "token_ids", None):
                token_times.setdefault(o.request_id, []).append(now)
            if o.request_done:
                finished[o.request_id] = now
                if sent < total:
                    submit()

    for _ in range(concurrency):
        submit()
    steps = 0
    started, cpu = time.perf_counter(), time.process_time()
    while len(finished) < total:
        engine.step(emit)
        steps += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    gaps = [b - a for t in token_times.values() for a, b in zip(t, t[1:])]
    return EngineResult(concurrency, total, total * max_tokens / wall, 1000 * wall / steps,
                        1000 * sum(gaps) / max(1, len(gaps)), wall, steps, 1000 * cpu / (total * max_tokens))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--raw", action="store_true", help="also the raw static model.generate batch, same dtype")
    ap.add_argument("--hf-cb", action="store_true", help="also transformers' continuous batching, same dtype")
    ap.add_argument("--static", action="store_true", help="the engine in static batching mode")
    ap.add_argument("--attention", choices=["auto", "slots", "sdpa", "paged", "varlen"],
                    help="KV cache layout and attention (INFERSTACK_ATTENTION); default: the settings'")
    ap.add_argument("--profile", action="store_true", help="torch profiler table over a few decode steps")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    from gpu_worker.precision import choose_dtype

    choice = choose_dtype(device, args.dtype)
    levels = [int(x) for x in args.concurrency.split(",")]
    engine, model_dir = build_engine(args.model, choice.dtype, device, max(levels), static=args.static,
                                     attention=args.attention)
    backend = getattr(engine.runner, "backend", None)
    print(f"{args.model}: {choice.name} ({choice.reason}); attention {getattr(backend, 'name', 'dense rows')}; "
          f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}", flush=True)
    run(engine, min(levels), 4, 1)  # warm-up
    out = {"dtype": choice.name, "engine": [], "raw": [], "load": os.getloadavg()[0]}
    for c in levels:
        res = run(engine, c, args.max_tokens, args.requests_per_client)
        out["engine"].append(asdict(res))
        print(f"engine c={c:<3} {res.tokens_per_s:7.1f} tok/s  step {res.step_ms:6.1f} ms  ITL {res.itl_ms:6.1f} ms "
              f"cpu {res.cpu_ms_per_token:5.2f} ms/tok ({res.steps} steps, {res.wall_s:.1f} s)", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(engine, max(levels), 8, 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if args.raw:
        from loadtest import raw

        tok, model = raw.load(str(model_dir), choice.dtype, device)
        for c in levels:
            cpu = time.process_time()
            res = raw.run_batch(tok, model, c, args.max_tokens)
            cpu_ms = 1000 * (time.process_time() - cpu) / (c * args.max_tokens)  # its warm-up included
            out["raw"].append(asdict(res) | {"cpu_ms_per_token": cpu_ms})
            mine = next(e for e in out["engine"] if e["concurrency"] == c)
            print(f"raw    b={c:<3} {res.tokens_per_s:7.1f} tok/s  ITL {1000 * res.total_s / args.max_tokens:6.1f} ms"
                  f"  cpu {cpu_ms:5.2f} ms/tok  -> engine/raw {mine['tokens_per_s'] / res.tokens_per_s:.2f}x",
                  flush=True)
        del model
    if args.hf_cb:
        from loadtest import hf_cb

        c = max(levels)
        cpu = time.process_time()
        res = hf_cb.run(str(model_dir), c, args.max_tokens, dtype=choice.dtype)
        res["cpu_ms_per_token"] = 1000 * (time.process_time() - cpu) / res["tokens"]
        out["hf_cb"] = res
        mine = next(e for e in out["engine"] if e["concurrency"] == c)
        print(f"hf-cb  c={c:<3} {res['tokens_per_s']:7.1f} tok/s  -> engine/hf-cb "
              f"{mine['tokens_per_s'] / res['tokens_per_s']:.2f}x", flush=True)
    out["load_after"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
