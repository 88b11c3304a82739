"""Closed-loop streaming benchmark of a running stack, next to the raw reference.

    python -m loadtest.bench --host http://127.0.0.1:8000 --concurrency 1,8,32 --max-tokens 64
    python -m loadtest.bench --raw --concurrency 1,8,32 --max-tokens 64
    python -m loadtest.bench --host ... --raw ...   # both, in one run (the stack must be idle for raw)

It starts nothing: point it at a stack (``make run``). Each of C clients sends a
streaming chat request (greedy, ``ignore_eos``, fixed ``max_tokens``), waits for the
end, sends the next. Reports output tokens/s, TTFT and inter-token latency
percentiles; ``--json`` writes everything for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from loadtest.prompts import chat_prompt
from loadtest.stats import pct


@dataclass
class RequestSample:
    ttft_s: float
    itl_s: list[float]
    tokens: int
    latency_s: float


@dataclass
class StackResult:
    concurrency: int
    requests: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    errors: int
    wall_s: float
    extra: dict = field(default_factory=dict)


async def one_request(client: httpx.AsyncClient, host: str, model: str, i: int, max_tokens: int,
                      headers: dict | None = None, **extra) -> RequestSample:
    body = {"model": model, "messages": chat_prompt(i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}
    started = time.perf_counter()
    first = last = None
    itl, tokens = [], 0
    async with client.stream("POST", f"{host}/v1/chat/completions", json=body, headers=headers or {}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                continue
            if first is None:
                first = now
            else:
                itl.append(now - last)
            last = now
    return RequestSample(first - started, itl, tokens, time.perf_counter() - started)


async def run_stack(host: str, model: str, concurrency: int, max_tokens: int, requests_per_client: int,
                    max_tokens_sampler=None, extra: dict | None = None) -> StackResult:
    """``extra``: more request fields (e.g. a response_format), on every request."""
    samples: list[RequestSample] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, host, model, 0, 4, **(extra or {}))  # warm-up (and a grammar compile)

        async def loop(c: int):
            nonlocal errors
            for k in range(requests_per_client):
                n = max_tokens_sampler() if max_tokens_sampler else max_tokens
                try:
                    samples.append(await one_request(client, host, model, c * requests_per_client + k, n,
                                                     **(extra or {})))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors += 1
                    print(f"  request failed: {exc}", file=sys.stderr)

        started = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in range(concurrency)))
        wall = time.perf_counter() - started
    ttft = [s.ttft_s * 1000 for s in samples]
    itl = [x * 1000 for s in samples for x in s.itl_s]
    return StackResult(concurrency, len(samples), sum(s.tokens for s in samples) / wall,
                       pct(ttft, 50), pct(ttft, 95), pct(itl, 50), pct(itl, 95), errors, wall)


def machine() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", help="stack to drive, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mixed", default="", help="LO-HI: draw max_tokens uniformly from this range instead")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="also run the raw model.generate reference in-process")
    ap.add_argument("--raw-repeats", type=int, default=1)
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the raw reference's INFERSTACK_DTYPE (default: as configured); start the stack with the same")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--label", default="stack")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    out = {"machine": machine(), "max_tokens": args.max_tokens, "mixed": args.mixed, "stack": [], "raw": [],
           "label": args.label}

    sampler = None
    if args.mixed:
        lo, hi = (int(x) for x in args.mixed.split("-"))
        rng = random.Random(0)
        sampler = lambda: rng.randint(lo, hi)  # noqa: E731

    if args.host:
        for c in levels:
            print(f"stack  c={c:<3} ...", flush=True)
            res = asyncio.run(run_stack(args.host, args.model, c, args.max_tokens, args.requests_per_client, sampler))
            out["stack"].append(asdict(res))
            print(f"stack  c={c:<3} {res.tokens_per_s:7.1f} tok/s  TTFT p50 {res.ttft_p50_ms:6.0f} ms "
                  f"p95 {res.ttft_p95_ms:6.0f} ms  ITL p50 {res.itl_p50_ms:5.0f} ms p95 {res.itl_p95_ms:5.0f} ms"
                  f"  ({res.requests} req, {res.errors} errors, {res.wall_s:.0f} s)", flush=True)
    if args.raw:
        from loadtest import raw

        if args.dtype:
            os.environ["INFERSTACK_DTYPE"] = args.dtype

        model_dir, device, precision = raw.stack_precision(args.model)
        out["dtype"] = precision.name
        print(f"raw    {precision.name} on {device} ({precision.reason}); start the stack with the same "
              "INFERSTACK_DTYPE", flush=True)
        tok, model = raw.load(str(model_dir), precision.dtype, device)
        for c in levels:
            res = raw.run_batch(tok, model, c, args.max_tokens, repeats=args.raw_repeats)
            out["raw"].append(asdict(res))
            print(f"raw    b={c:<3} {res.tokens_per_s:7.1f} tok/s  prefill {res.prefill_s * 1000:6.0f} ms",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if out["stack"] and out["raw"]:
        print("\n| c | stack tok/s | raw tok/s | ratio | TTFT p50 / p95 ms | ITL p50 / p95 ms |")
        print("|---|---|---|---|---|---|")
        raw_by = {r["batch"]: r for r in out["raw"]}
        for s in out["stack"]:
            r = raw_by.get(s["concurrency"])
            ratio = s["tokens_per_s"] / r["tokens_per_s"] if r else float("nan")
            print(f"| {s['concurrency']} | {s['tokens_per_s']:.1f} | {r['tokens_per_s'] if r else float('nan'):.1f} | "
                  f"{ratio:.2f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                  f"{s['itl_p50_ms']:.0f} / {s['itl_p95_ms']:.0f} |")


if __name__ == "__main__":
    main()
