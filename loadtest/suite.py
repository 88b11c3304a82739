"""Runs the recorded benchmark suite end to end on this machine and prints the
markdown for docs/BENCHMARKS.md:

    python -m loadtest.suite --out loadtest/results/suite.json

It starts its own redis-server and, per batching mode, a local stack
(``inferstack up`` on a free port), drives it with ``loadtest.bench`` (closed-loop
streaming clients) and stops it. The raw ``model.generate`` reference runs in this
process right after each stack measurement at the same concurrency, while the stack
sits idle, so that each ratio compares two numbers taken a minute apart on this
noisy shared machine; each pair is repeated and the medians are reported. Unlike
``make bench`` (which only drives a stack you started), this starts and stops stacks
itself so that one command reproduces every number.

Overheads are read around the c=32 run: the worker's publisher time per generated
token (one pipelined RPUSH + PUBLISH round trip per step, from its heartbeat), and
the CPU seconds per token of the API process and of redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import httpx
import psutil
import redis

from inferstack.redis_server import RedisServer, free_port
from loadtest import bench, raw

MODEL = "smollm2-135m"


def start_stack(mode: str, env_extra: dict | None = None, redis_url: str | None = None):
    port = free_port()
    env = {**os.environ, "INFERSTACK_BATCHING": mode, "PORT": str(port), "INFERSTACK_LOG_LEVEL": "WARNING",
           **(env_extra or {})}
    env.pop("REDIS_URL", None)
    env.pop("INFERSTACK_REDIS_URL", None)
    if redis_url:
        env["INFERSTACK_REDIS_URL"] = redis_url
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
        proc.wait()


def child(proc: subprocess.Popen, what: str) -> psutil.Process:
    for c in psutil.Process(proc.pid).children(recursive=True):
        if what in " ".join(c.cmdline()):
            return c
    raise LookupError(what)


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def worker_counters(r: redis.Redis) -> dict:
    ids = r.zrange("is:workers", 0, -1)
    info = r.hgetall(f"is:worker:{ids[0]}")
    return {k: float(info[k]) for k in ("tokens_generated", "publish_busy_s", "publish_round_trips")}


def median_of(rows: list[dict]) -> dict:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in rows)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="continuous,static")
    ap.add_argument("--mixed", default="16-256", help="max_tokens range of the mixed-length scenario ('' to skip)")
    ap.add_argument("--mixed-concurrency", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--hf-cb", action="store_true", help="also time transformers' generate_batch at the top level")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                    help="pin INFERSTACK_DTYPE for the stacks and the raw reference (default: as configured)")
    ap.add_argument("--out", default="loadtest/results/suite.json")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    result = {"machine": bench.machine(), "max_tokens": args.max_tokens, "stack": {}, "raw": {}, "mixed": {},
              "overhead": {}, "hf_cb": None}

    if args.dtype:
        os.environ["INFERSTACK_DTYPE"] = args.dtype  # the stacks started below inherit it
    model_dir, device, precision = raw.stack_precision(MODEL)
    result["dtype"] = precision.name
    print(f"stack and raw reference in {precision.name} on {device} ({precision.reason})", flush=True)
    tok, model = raw.load(str(model_dir), precision.dtype, device)
    server = RedisServer()
    r = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        for mode in args.modes.split(","):
            proc, url = start_stack(mode, redis_url=server.url)
            try:
                api, redis_proc = child(proc, "inferstack.cli api"), psutil.Process(server.proc.pid)
                rows, raws = [], {}
                for c in levels:
                    stack_runs, raw_runs = [], []
                    for rep in range(args.repeats):
                        before = (worker_counters(r), cpu_s(api), cpu_s(redis_proc))
                        res = asyncio.run(bench.run_stack(url, MODEL, c, args.max_tokens, args.requests_per_client))
                        after = (worker_counters(r), cpu_s(api), cpu_s(redis_proc))
                        stack_runs.append(asdict(res))
                        if mode == "continuous" and c == max(levels) and rep == 0:
                            tokens = after[0]["tokens_generated"] - before[0]["tokens_generated"]
                            result["overhead"] = {
                                "tokens": tokens,
                                "publish_ms_per_token": 1000 * (after[0]["publish_busy_s"] - before[0]["publish_busy_s"]) / tokens,
                                "publish_round_trips_per_token": (after[0]["publish_round_trips"] - before[0]["publish_round_trips"]) / tokens,
                                "api_cpu_ms_per_token": 1000 * (after[1] - before[1]) / tokens,
                                "redis_cpu_ms_per_token": 1000 * (after[2] - before[2]) / tokens,
                            }
                        if mode == "continuous":
                            raw_runs.append(asdict(raw.run_batch(tok, model, c, args.max_tokens)))
                        print(f"{mode:10} c={c:<3} {res.tokens_per_s:7.1f} tok/s  TTFT p50 {res.ttft_p50_ms:6.0f} ms"
                              f"  ITL p50 {res.itl_p50_ms:5.0f} ms  errors {res.errors}"
                              + (f"   raw {raw_runs[-1]['tokens_per_s']:7.1f} tok/s, prefill "
                                 f"{raw_runs[-1]['prefill_s'] * 1000:5.0f} ms" if raw_runs else ""), flush=True)
                    rows.append(median_of(stack_runs))
                    if raw_runs:
                        raws[c] = median_of(raw_runs)
                result["stack"][mode] = rows
                if raws:
                    result["raw"] = {str(k): v for k, v in raws.items()}
                if args.mixed:
                    lo, hi = (int(x) for x in args.mixed.split("-"))
                    rng = random.Random(0)
                    res = asyncio.run(bench.run_stack(url, MODEL, args.mixed_concurrency, 0, 4,
                                                      lambda: rng.randint(lo, hi)))
                    print(f"{mode:10} mixed {args.mixed} c={args.mixed_concurrency}: {res.tokens_per_s:7.1f} tok/s  "
                          f"TTFT p50 {res.ttft_p50_ms:6.0f} p95 {res.ttft_p95_ms:6.0f} ms", flush=True)
                    result["mixed"][mode] = asdict(res)
            finally:
                stop_stack(proc)
        if args.hf_cb:
            from loadtest import hf_cb

            result["hf_cb"] = hf_cb.run(str(model_dir), max(levels), args.max_tokens, attn="sdpa",
                                        dtype=precision.dtype)
            print(f"transformers generate_batch b={max(levels)}: {result['hf_cb']['tokens_per_s']:.1f} tok/s")
    finally:
        server.stop()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))


def markdown(result: dict) -> str:
    raw_by = {int(k): v for k, v in result["raw"].items()}
    lines = [f"dtype: {result.get('dtype', 'float32')}", "",
             "| mode | c | stack tok/s | raw tok/s | stack / raw | TTFT p50 / p95 ms | raw prefill ms | ITL p50 / p95 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, rows in result["stack"].items():
        for s in rows:
            r = raw_by.get(s["concurrency"], {})
            rt = r.get("tokens_per_s", float("nan"))
            lines.append(f"| {mode} | {s['concurrency']} | {s['tokens_per_s']:.1f} | {rt:.1f} | "
                         f"{s['tokens_per_s'] / rt:.2f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                         f"{r.get('prefill_s', float('nan')) * 1000:.0f} | "
                         f"{s['itl_p50_ms']:.0f} / {s['itl_p95_ms']:.0f} |")
    if result["mixed"]:
        lines += ["", "| mixed lengths | tok/s | TTFT p50 / p95 ms | requests |", "|---|---|---|---|"]
        for mode, s in result["mixed"].items():
            lines.append(f"| {mode} | {s['tokens_per_s']:.1f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | "
                         f"{s['requests']} |")
    if result["overhead"]:
        o = result["overhead"]
        lines += ["", "| per generated token (c=max) | value |", "|---|---|",
                  f"| worker publisher (pipelined RPUSH + SPUBLISH) | {o['publish_ms_per_token']:.3f} ms |",
                  f"| publisher round trips | {o['publish_round_trips_per_token']:.3f} |",
                  f"| API process CPU (relay + SSE) | {o['api_cpu_ms_per_token']:.3f} ms |",
                  f"| redis-server CPU | {o['redis_cpu_ms_per_token']:.3f} ms |"]
    if result.get("hf_cb"):
        h = result["hf_cb"]
        lines += ["", f"transformers `generate_batch` (continuous batching, {h['attn']}), batch {h['batch']}: "
                      f"{h['tokens_per_s']:.1f} tok/s"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
