"""Scheduling scenario: tenants of different tiers and appetites share one worker.

    python -m loadtest.scheduling --duration 60 --out loadtest/results/scheduling.json

For fairness on and off (``INFERSTACK_FAIRNESS``), starts a local stack (a keys
file maps four API keys to tenants and tiers; the worker runs ``--max-batch`` rows so
that a backlog forms and the policy decides who goes next), runs the tenants below
concurrently for ``--duration`` seconds, and reports per tenant: requests, TTFT
p50/p95 and share of the generated tokens.

| tenant | tier | clients (closed loop) | think time |
|---|---|---|---|
| flood | normal | 24 | 0 |
| light | normal | 2 | 1 s |
| vip | high | 1 | 1 s |
| background | low | 4 | 0 |
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

import httpx

from api.auth import hash_key
from loadtest.bench import machine, one_request
from loadtest.stats import pct
from loadtest.suite import start_stack, stop_stack

TENANTS = {  # name: (tier, clients, think_s)
    "flood": ("normal", 24, 0.0),
    "light": ("normal", 2, 1.0),
    "vip": ("high", 1, 1.0),
    "background": ("low", 4, 0.0),
}


def keys_file() -> str:
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        for name, (tier, _, _) in TENANTS.items():
            f.write(f'[keys."{hash_key("sk-" + name)}"]\nuser = "{name}"\ntier = "{tier}"\n'
                    f"max_queued = 1000\n")
    return path


async def run_tenants(url: str, duration_s: float, max_tokens: int) -> dict:
    samples: dict[str, list] = {name: [] for name in TENANTS}
    errors: dict[str, int] = {name: 0 for name in TENANTS}
    stop_at = time.monotonic() + duration_s

    async def client_loop(client, name, idx, think_s):
        headers = {"Authorization": f"Bearer sk-{name}"}
        k = 0
        while time.monotonic() < stop_at:
            try:
                samples[name].append(await one_request(client, url, "smollm2-135m", idx * 1000 + k, max_tokens,
                                                       headers=headers))
            except Exception:  # noqa: BLE001 - counted
                errors[name] += 1
            k += 1
            if think_s:
                await asyncio.sleep(think_s)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, "smollm2-135m", 0, 4, headers={"Authorization": "Bearer sk-light"})
        tasks = [client_loop(client, name, i, think) for name, (_, n, think) in TENANTS.items() for i in range(n)]
        await asyncio.gather(*tasks)
    total_tokens = sum(s.tokens for v in samples.values() for s in v) or 1
    out = {}
    for name, v in samples.items():
        ttft = [s.ttft_s * 1000 for s in v]
        out[name] = {"tier": TENANTS[name][0], "clients": TENANTS[name][1], "requests": len(v),
                     "errors": errors[name], "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
                     "token_share": sum(s.tokens for s in v) / total_tokens}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default="loadtest/results/scheduling.json")
    args = ap.parse_args(argv)
    result = {"machine": machine(), "duration_s": args.duration, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "modes": {}}
    kf = keys_file()
    try:
        for fair in ("true", "false"):
            proc, url = start_stack("continuous", {"INFERSTACK_FAIRNESS": fair, "INFERSTACK_KEYS_FILE": kf,
                                                   "INFERSTACK_MAX_BATCH": str(args.max_batch)})
            try:
                res = asyncio.run(run_tenants(url, args.duration, args.max_tokens))
            finally:
                stop_stack(proc)
            result["modes"]["fair" if fair == "true" else "fifo"] = res
            for name, r in res.items():
                print(f"fairness={fair:5} {name:10} {r['tier']:6} req {r['requests']:4}  TTFT p50 {r['ttft_p50_ms']:7.0f}"
                      f" p95 {r['ttft_p95_ms']:7.0f} ms  share {r['token_share']:.2f}  errors {r['errors']}", flush=True)
    finally:
        os.unlink(kf)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| tenant | tier | clients | fairness on: req / TTFT p50 / p95 ms / token share | "
          "off (FIFO): req / TTFT p50 / p95 ms / token share |")
    print("|---|---|---|---|---|")
    for name in TENANTS:
        on, off = result["modes"]["fair"][name], result["modes"]["fifo"][name]
        print(f"| {name} | {on['tier']} | {on['clients']} | {on['requests']} / {on['ttft_p50_ms']:.0f} / "
              f"{on['ttft_p95_ms']:.0f} / {on['token_share']:.2f} | {off['requests']} / {off['ttft_p50_ms']:.0f} / "
              f"{off['ttft_p95_ms']:.0f} / {off['token_share']:.2f} |")


if __name__ == "__main__":
    main()
