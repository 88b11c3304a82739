"""Isolation under a full batch: a newcomer's time to first token behind a batch
full of long generations, with preemption on and off, in the same run.

    python -m loadtest.preemption --duration 120 --out loadtest/results/preemption.json

Per scenario and mode (``INFERSTACK_PREEMPTION=true|false``) it starts its own stack
(``inferstack up``, SmolLM2-135M, ``--max-batch`` rows) on its own redis-server, then:

* the flood: ``--max-batch`` closed-loop streaming clients of one user, each asking
  for ``--flood-tokens`` tokens with ``ignore_eos`` (greedy), started together so the
  batch is full of long generations;
* once every flood stream has its first token (the batch is full), the newcomer:
  one client of another user sending ``--newcomer-tokens``-token requests one after
  the other (``--think`` seconds apart) for ``--duration`` seconds.

| scenario | flood | newcomer |
|---|---|---|
| share | user `flood`, tier normal | user `newcomer`, tier normal (under its fair share) |
| tier | user `flood`, `"priority": "low"` | user `newcomer`, tier normal (a higher tier) |

Reported: the newcomer's TTFT p50/p95/max and request count, the flood's throughput
(streamed tokens per second while the newcomer runs) and the preemptions the
worker made (from its heartbeat). Beside the flood's tokens per second, its tokens
per CPU-second of the workers: wall-clock throughput on a shared 2-core machine moves
±15 % between identical runs, the work each token costs much less. A newcomer
request still waiting when the window closes counts with the time it had waited so far (a lower bound).
``--repeats N`` runs each scenario N times per mode, alternating the modes so that drift
on a shared machine hits both; TTFTs are pooled and the flood's throughput is the
median run's (every run's is in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import httpx
import psutil
import redis

from broker import keys
from inferstack.redis_server import RedisServer
from loadtest.bench import machine
from loadtest.prompts import chat_prompt
from loadtest.stats import pct
from loadtest.suite import MODEL, start_stack, stop_stack

SCENARIOS = {  # name: (flood priority, newcomer priority)
    "share": ("normal", "normal"),
    "tier": ("low", "normal"),
}


async def stream(client: httpx.AsyncClient, url: str, i: int, user: str, priority: str, max_tokens: int,
                 on_token) -> None:
    """One greedy streaming chat request; ``on_token(now)`` for each content chunk."""
    body = {"model": MODEL, "messages": chat_prompt(i), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "user": user, "priority": priority}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("choices"):
                    on_token(time.monotonic())


def cpu_by_process(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of each process named by its role (``inferstack.cli <role>``,
    redis-server, this benchmark), children included: where the two cores go."""
    out: dict[str, float] = {}
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    seen: set[int] = set()
    for p in procs:
        if p.pid in seen:  # the stack is this process's child too: count each process once
            continue
        seen.add(p.pid)
        try:
            cmd = p.cmdline()
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        role = cmd[cmd.index("inferstack.cli") + 1] if "inferstack.cli" in cmd else (
            "redis-server" if "redis-server" in " ".join(cmd[:1]) else "benchmark" if p.pid == os.getpid() else
            os.path.basename(cmd[0]) if cmd else "?")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


async def run_scenario(url: str, flood_priority: str, newcomer_priority: str, args, by_process=dict) -> dict:
    flood_tokens: list[float] = []
    started: set[int] = set()
    errors = {"flood": 0, "newcomer": 0}
    stop = asyncio.Event()

    async def flood_client(client, k):
        n = 0
        while not stop.is_set():
            def on_token(now, k=k):
                flood_tokens.append(now)
                started.add(k)
            try:
                await stream(client, url, k + 32 * n, "flood", flood_priority, args.flood_tokens, on_token)
            except (httpx.HTTPError, RuntimeError):
                errors["flood"] += 1
            n += 1

    ttfts: list[float] = []
    pending: dict[str, float] = {}

    async def newcomer(client):
        n = 0
        while not stop.is_set():
            sent = time.monotonic()
            first: list[float] = []
            pending["t"] = sent
            try:
                await stream(client, url, 1000 + n, "newcomer", newcomer_priority, args.newcomer_tokens,
                             lambda now: first.append(now))
                ttfts.append(first[0] - sent)
            except (httpx.HTTPError, RuntimeError):
                errors["newcomer"] += 1
            pending.pop("t", None)
            n += 1
            await asyncio.sleep(args.think)

    limits = httpx.Limits(max_connections=args.max_batch + 8, max_keepalive_connections=args.max_batch + 8)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        flood = [asyncio.create_task(flood_client(client, k)) for k in range(args.max_batch)]
        deadline = time.monotonic() + 600
        while len(started) < args.max_batch:  # the batch is full of long generations
            if time.monotonic() > deadline:
                raise RuntimeError("the flood never filled the batch")
            await asyncio.sleep(0.1)
        window_start, procs_start = time.monotonic(), by_process()
        newcomer_task = asyncio.create_task(newcomer(client))
        await asyncio.sleep(args.duration)
        window_end, procs_end = time.monotonic(), by_process()
        stop.set()
        if "t" in pending:  # still waiting: count what it waited so far (a lower bound)
            ttfts.append(window_end - pending["t"])
        for t in flood + [newcomer_task]:
            t.cancel()
        await asyncio.gather(*flood, newcomer_task, return_exceptions=True)
    window = window_end - window_start
    in_window = sum(1 for t in flood_tokens if window_start <= t <= window_end)
    ms = [t * 1000 for t in ttfts]
    return {"newcomer_requests": len(ttfts), "ttft_p50_ms": pct(ms, 50), "ttft_p95_ms": pct(ms, 95),
            "ttft_max_ms": max(ms, default=float("nan")), "flood_tokens_per_s": in_window / window,
            "flood_tokens_per_cpu_s": in_window / max(procs_end.get("worker", 0.0) - procs_start.get("worker", 0.0), 1e-9),
            "window_s": window, "errors": errors, "ttfts_ms": ms,
            "cores_by_process": {k: round((procs_end[k] - procs_start.get(k, 0.0)) / window, 3) for k in procs_end}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=120, help="seconds the newcomer runs, per scenario and mode")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--flood-tokens", type=int, default=256)
    ap.add_argument("--newcomer-tokens", type=int, default=16)
    ap.add_argument("--think", type=float, default=1.0, help="seconds between the newcomer's requests")
    ap.add_argument("--scenarios", default="share,tier")
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per scenario and mode, alternating modes (drift on a shared machine hits both)")
    ap.add_argument("--out", default="loadtest/results/preemption.json")
    args = ap.parse_args(argv)
    result = {"machine": machine(), "args": vars(args), "runs": {}, "repeats": {}}
    for scenario in args.scenarios.split(","):
        for rep, mode in [(k, m) for k in range(args.repeats) for m in args.modes.split(",")]:
            server = RedisServer()
            try:
                proc, url = start_stack("continuous", {"INFERSTACK_PREEMPTION": "true" if mode == "on" else "false",
                                                       "INFERSTACK_MAX_BATCH": str(args.max_batch)},
                                        redis_url=server.url)
                r = redis.Redis.from_url(server.url, decode_responses=True)
                try:
                    res = asyncio.run(run_scenario(
                        url, *SCENARIOS[scenario], args,
                        by_process=lambda: cpu_by_process([proc.pid, server.proc.pid, os.getpid()])))
                    res["preemptions"] = sum(int(r.hget(keys.worker(w), "preemptions") or 0)
                                             for w in r.zrange(keys.WORKERS, 0, -1))  # its heartbeat
                finally:
                    r.close()
                    stop_stack(proc)
            finally:
                server.stop()
            result["repeats"].setdefault(f"{scenario}/{mode}", []).append(res)
            result["runs"][f"{scenario}/{mode}"] = merged(result["repeats"][f"{scenario}/{mode}"])
            print(f"{scenario:6} preemption {mode:3} (run {rep + 1}): newcomer TTFT p50 {res['ttft_p50_ms']:7.0f} ms  p95 "
                  f"{res['ttft_p95_ms']:7.0f}  max {res['ttft_max_ms']:7.0f}  ({res['newcomer_requests']} requests)  "
                  f"flood {res['flood_tokens_per_s']:6.1f} tok/s, {res['flood_tokens_per_cpu_s']:5.1f} per worker CPU-s  preemptions {res['preemptions']}  "
                  f"errors {res['errors']}\n    cores by process: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["cores_by_process"].items())), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))


def merged(runs: list[dict]) -> dict:
    """Repeats of one scenario and mode as one row: TTFTs pooled, flood throughput the
    median over the runs, counts summed."""
    ms = sorted(t for r in runs for t in r["ttfts_ms"])
    return {"newcomer_requests": len(ms), "ttft_p50_ms": pct(ms, 50), "ttft_p95_ms": pct(ms, 95),
            "ttft_max_ms": max(ms, default=float("nan")), "flood_tokens_per_s": statistics.median(r["flood_tokens_per_s"] for r in runs),
            "flood_tokens_per_cpu_s": statistics.median(r["flood_tokens_per_cpu_s"] for r in runs),
            "flood_tokens_per_s_runs": [r["flood_tokens_per_s"] for r in runs],
            "window_s": sum(r["window_s"] for r in runs), "preemptions": sum(r["preemptions"] for r in runs),
            "errors": {k: sum(r["errors"][k] for r in runs) for k in ("flood", "newcomer")}}


def markdown(result: dict) -> str:
    lines = ["| scenario | preemption | newcomer TTFT p50 / p95 / max ms | newcomer requests | flood tok/s "
             "(runs) | flood vs off | flood tokens per worker CPU-s | vs off | preemptions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in result["runs"].items():
        scenario, mode = key.split("/")
        off = result["runs"].get(f"{scenario}/off")
        ratio = f"{r['flood_tokens_per_s'] / off['flood_tokens_per_s']:.2f}" if off else "-"
        cpu_ratio = f"{r['flood_tokens_per_cpu_s'] / off['flood_tokens_per_cpu_s']:.2f}" if off else "-"
        runs = ", ".join(f"{x:.1f}" for x in r.get("flood_tokens_per_s_runs", [r["flood_tokens_per_s"]]))
        lines.append(f"| {scenario} | {mode} | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} / {r['ttft_max_ms']:.0f} "
                     f"| {r['newcomer_requests']} | {r['flood_tokens_per_s']:.1f} ({runs}) | {ratio} "
                     f"| {r['flood_tokens_per_cpu_s']:.1f} | {cpu_ratio} | {r['preemptions']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
