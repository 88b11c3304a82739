"""Structured outputs under load: throughput with every request constrained by a JSON
schema against none, and time to first token with a cached grammar, in one run.

    python -m loadtest.structured --host http://127.0.0.1:8000 --concurrency 32 --max-tokens 64
    python -m loadtest.structured --concurrency 32 --rounds 2 --json loadtest/results/structured.json

Without ``--host`` it starts a local stack (``inferstack up``) and stops it after.
Throughput phases alternate (free, constrained, free, ...; ``--rounds`` pairs) so drift
on a shared machine hits both alike. Every request is greedy with ``ignore_eos`` and a
fixed ``max_tokens``; the schema's one string field has a ``minLength`` beyond what
``max_tokens`` can write, so constrained requests run to the same length as free ones
and every decode step masks every row. TTFT is measured at concurrency 1, alternating
free and constrained requests, after a warm-up that compiled the grammar.
Targets (issue 14): at most 5 % throughput loss; constrained TTFT within 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics

import httpx

from loadtest.bench import machine, one_request, run_stack
from loadtest.stats import pct

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 1000}},
          "required": ["answer"], "additionalProperties": False}
CONSTRAINED = {"response_format": {"type": "json_schema", "json_schema": {
    "name": "answer", "schema": SCHEMA, "strict": True}}}


async def ttft_pairs(host: str, model: str, pairs: int) -> tuple[list[float], list[float]]:
    free, constrained = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        await one_request(client, host, model, 0, 2, **CONSTRAINED)  # the grammar is compiled and cached
        for i in range(pairs):
            free.append((await one_request(client, host, model, i, 4)).ttft_s * 1000)
            constrained.append((await one_request(client, host, model, i, 4, **CONSTRAINED)).ttft_s * 1000)
    return free, constrained


def bench(host: str, args) -> dict:
    out = {"machine": machine(), "load_avg_before": os.getloadavg(), "concurrency": args.concurrency,
           "max_tokens": args.max_tokens, "rounds": [], "schema": SCHEMA}
    for r in range(args.rounds):
        for label, extra in (("free", None), ("constrained", CONSTRAINED)):
            res = asyncio.run(run_stack(host, args.model, args.concurrency, args.max_tokens,
                                        args.requests_per_client, extra=extra))
            out["rounds"].append({"round": r, "mode": label, "tokens_per_s": res.tokens_per_s,
                                  "ttft_p50_ms": res.ttft_p50_ms, "itl_p50_ms": res.itl_p50_ms,
                                  "requests": res.requests, "errors": res.errors, "wall_s": res.wall_s})
            print(f"round {r} {label:<11} c={args.concurrency}: {res.tokens_per_s:7.1f} tok/s  "
                  f"TTFT p50 {res.ttft_p50_ms:6.0f} ms  ITL p50 {res.itl_p50_ms:5.0f} ms  "
                  f"({res.requests} req, {res.errors} errors)", flush=True)
    free, constrained = asyncio.run(ttft_pairs(host, args.model, args.ttft_pairs))
    out["ttft_c1_ms"] = {"free_p50": pct(free, 50), "constrained_p50": pct(constrained, 50),
                         "free": free, "constrained": constrained}
    out["load_avg_after"] = os.getloadavg()
    tps = {m: sum(x["tokens_per_s"] for x in out["rounds"] if x["mode"] == m) / args.rounds
           for m in ("free", "constrained")}
    out["loss_pct"] = 100 * (1 - tps["constrained"] / tps["free"])
    out["ttft_delta_ms"] = out["ttft_c1_ms"]["constrained_p50"] - out["ttft_c1_ms"]["free_p50"]
    # Each pair ran back to back, so the median of the pairs' differences is the least
    # sensitive to a shared machine's drift (a few 500 ms outliers move a p50 of 10).
    out["ttft_paired_delta_ms"] = statistics.median(c - f for f, c in zip(free, constrained))
    print(f"\n| c | free tok/s | constrained tok/s | loss | TTFT c=1 p50 free / constrained | delta |\n"
          f"|---|---|---|---|---|---|\n| {args.concurrency} | {tps['free']:.1f} | {tps['constrained']:.1f} | "
          f"{out['loss_pct']:.1f} % | {out['ttft_c1_ms']['free_p50']:.0f} / "
          f"{out['ttft_c1_ms']['constrained_p50']:.0f} ms | {out['ttft_delta_ms']:+.0f} ms "
          f"(paired median {out['ttft_paired_delta_ms']:+.0f} ms) |")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", help="a running stack; default: start one here")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="free/constrained pairs of throughput phases")
    ap.add_argument("--ttft-pairs", type=int, default=30)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    proc = None
    host = args.host
    if host is None:
        from loadtest.suite import start_stack

        print("starting a local stack ...", flush=True)
        proc, host = start_stack("continuous")
    try:
        out = bench(host, args)
    finally:
        if proc is not None:
            from loadtest.suite import stop_stack

            stop_stack(proc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
