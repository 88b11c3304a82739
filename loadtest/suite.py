"""Runs the recorded benchmark suite end to end on this machine and prints the
markdown for docs/BENCHMARKS.md:

    python -m loadtest.suite --out loadtest/results/suite.json

For each batching mode it starts a local stack (``inferstack up`` on a free port),
drives it with ``loadtest.bench`` (closed-loop streaming clients), stops it, and then
runs the raw ``model.generate`` reference in-process while nothing else runs. Unlike
``make bench`` (which only drives a stack you started), this starts and stops stacks
itself so that one command reproduces every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import httpx

from inferstack.redis_server import free_port
from loadtest import bench, raw


def start_stack(mode: str, env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "INFERSTACK_BATCHING": mode, "PORT": str(port), "INFERSTACK_LOG_LEVEL": "WARNING",
           **(env_extra or {})}
    env.pop("REDIS_URL", None)
    env.pop("INFERSTACK_REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "inferstack.cli", "up"], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("stack exited")
        time.sleep(0.5)
    raise RuntimeError("stack did not become ready")


def stop_stack(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="continuous,static")
    ap.add_argument("--mixed", default="16-256", help="max_tokens range of the mixed-length scenario ('' to skip)")
    ap.add_argument("--mixed-concurrency", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--out", default="loadtest/results/suite.json")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    result = {"machine": bench.machine(), "max_tokens": args.max_tokens, "stack": {}, "mixed": {}, "raw": []}

    for mode in args.modes.split(","):
        proc, url = start_stack(mode)
        try:
            rows = []
            for c in levels:
                res = asyncio.run(bench.run_stack(url, "smollm2-135m", c, args.max_tokens, args.requests_per_client))
                print(f"{mode:10} c={c:<3} {res.tokens_per_s:7.1f} tok/s  TTFT p50 {res.ttft_p50_ms:6.0f} ms  "
                      f"ITL p50 {res.itl_p50_ms:5.0f} ms  errors {res.errors}", flush=True)
                rows.append(asdict(res))
            result["stack"][mode] = rows
            if args.mixed:
                lo, hi = (int(x) for x in args.mixed.split("-"))
                rng = random.Random(0)
                res = asyncio.run(bench.run_stack(url, "smollm2-135m", args.mixed_concurrency, 0, 4,
                                                  lambda: rng.randint(lo, hi)))
                print(f"{mode:10} mixed {args.mixed} c={args.mixed_concurrency}: {res.tokens_per_s:7.1f} tok/s  "
                      f"TTFT p50 {res.ttft_p50_ms:6.0f} p95 {res.ttft_p95_ms:6.0f} ms", flush=True)
                result["mixed"][mode] = asdict(res)
        finally:
            stop_stack(proc)

    from gpu_worker.settings import WorkerSettings
    from inferstack import modelstore
    from inferstack.registry import Registry

    settings = WorkerSettings()
    model_dir = modelstore.resolve(Registry.load(settings.models_file)["smollm2-135m"], settings.cache_dir)
    tok, model = raw.load(str(model_dir))
    for c in levels:
        res = raw.run_batch(tok, model, c, args.max_tokens)
        print(f"raw        b={c:<3} {res.tokens_per_s:7.1f} tok/s  prefill {res.prefill_s * 1000:6.0f} ms", flush=True)
        result["raw"].append(asdict(res))

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))


def markdown(result: dict) -> str:
    raw_by = {r["batch"]: r for r in result["raw"]}
    lines = ["| mode | c | stack tok/s | raw tok/s (same run) | stack / raw | TTFT p50 / p95 ms | ITL p50 / p95 ms |",
             "|---|---|---|---|---|---|---|"]
    for mode, rows in result["stack"].items():
        for s in rows:
            r = raw_by.get(s["concurrency"], {})
            rt = r.get("tokens_per_s", float("nan"))
            lines.append(f"| {mode} | {s['concurrency']} | {s['tokens_per_s']:.1f} | {rt:.1f} | "
                         f"{s['tokens_per_s'] / rt:.2f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                         f"{s['itl_p50_ms']:.0f} / {s['itl_p95_ms']:.0f} |")
    if result["mixed"]:
        lines += ["", "| mixed lengths | tok/s | TTFT p50 / p95 ms | requests |", "|---|---|---|---|"]
        for mode, s in result["mixed"].items():
            lines.append(f"| {mode} | {s['tokens_per_s']:.1f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                         f"{s['requests']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
