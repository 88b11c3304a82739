"""Multi-turn scenario: conversations of several turns that share a system prompt and
grow to 1-2k tokens, with KV reuse on and off.

    python -m loadtest.multiturn --conversations 6 --turns 8 --out loadtest/results/multiturn.json

For each setting it starts a local stack (reuse off: ``INFERSTACK_KV_REUSE=false``),
runs the conversations (``--concurrency`` at a time, each turn streamed with a
``session_id``, greedy, ``max_tokens`` per answer), and records per turn: TTFT, prompt
tokens and cached tokens (from the usage chunk). The worker's KV statistics (hits,
bytes per token, save/restore time) come from its heartbeat in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time

import httpx
import redis

from inferstack.redis_server import RedisServer
from loadtest.bench import machine
from loadtest.stats import mean, pct
from loadtest.suite import start_stack, stop_stack

SYSTEM = ("You are a meticulous assistant for a logistics company. Answer in plain English, cite the relevant "
          "policy section when you can, keep answers short, never invent shipment numbers, and ask for "
          "clarification when a question is ambiguous. ") * 4

SENTENCES = [
    "The shipment left the warehouse in Rotterdam on Monday morning.",
    "Our customer reports that two pallets arrived with damaged corners.",
    "The invoice lists forty boxes, but the delivery note says thirty-eight.",
    "A driver called to say the loading dock was closed for maintenance.",
    "The refrigerated container must stay below four degrees at all times.",
    "Customs requested an updated commercial invoice with the HS codes.",
    "The client wants to change the delivery address to their new depot.",
    "We received a complaint about the tracking page not updating for two days.",
]


def user_turn(rng: random.Random, k: int) -> str:
    return f"Question {k}: " + " ".join(rng.choice(SENTENCES) for _ in range(7)) + " What should we do next?"


async def turn(client, url, messages, session, max_tokens) -> dict:
    body = {"model": "smollm2-135m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if session:
        body["session_id"] = session
    started = time.perf_counter()
    ttft, text, usage = None, [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"]:
                ttft = ttft or time.perf_counter() - started
                text.append(chunk["choices"][0]["delta"].get("content") or "")
    return {"ttft_ms": ttft * 1000, "text": "".join(text), "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


async def conversations(url: str, n: int, turns: int, concurrency: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    rows: list[dict] = []

    async def one(c: int):
        rng = random.Random(c)
        messages = [{"role": "system", "content": SYSTEM}]
        async with sem:
            async with httpx.AsyncClient(timeout=600) as client:
                for k in range(turns):
                    messages.append({"role": "user", "content": user_turn(rng, k)})
                    res = await turn(client, url, messages, f"conv-{c}", max_tokens)
                    rows.append({"conversation": c, "turn": k, **{x: y for x, y in res.items() if x != "text"}})
                    messages.append({"role": "assistant", "content": res["text"]})

    await asyncio.gather(*(one(c) for c in range(n)))
    return rows


def summarize(rows: list[dict]) -> dict:
    follow = [r for r in rows if r["turn"] > 0]
    near_1k = [r for r in follow if 800 <= r["prompt_tokens"] <= 1300]
    return {
        "turns": len(rows),
        "max_prompt_tokens": max(r["prompt_tokens"] for r in rows),
        "follow_up_ttft_p50_ms": pct([r["ttft_ms"] for r in follow], 50),
        "follow_up_ttft_mean_ms": mean([r["ttft_ms"] for r in follow]),
        "ttft_at_1k_mean_ms": mean([r["ttft_ms"] for r in near_1k]),
        "ttft_at_1k_n": len(near_1k),
        "first_turn_ttft_mean_ms": mean([r["ttft_ms"] for r in rows if r["turn"] == 0]),
        "prefill_saved_pct": 100 * sum(r["cached_tokens"] for r in rows) / sum(r["prompt_tokens"] for r in rows),
        "follow_up_saved_pct": 100 * sum(r["cached_tokens"] for r in follow) / sum(r["prompt_tokens"] for r in follow),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="loadtest/results/multiturn.json")
    args = ap.parse_args(argv)
    result = {"machine": machine(), "args": vars(args), "runs": {}}
    for reuse in ("true", "false"):
        server = RedisServer()
        proc, url = start_stack("continuous", {"INFERSTACK_KV_REUSE": reuse}, redis_url=server.url)
        try:
            rows = asyncio.run(conversations(url, args.conversations, args.turns, args.concurrency, args.max_tokens))
            r = redis.Redis.from_url(server.url, decode_responses=True)
            wid = r.zrange("is:workers", 0, -1)[0]
            kv = json.loads(r.hget(f"is:worker:{wid}", "kv"))["smollm2-135m"]
        finally:
            stop_stack(proc)
            server.stop()
        summary = summarize(rows)
        result["runs"]["reuse" if reuse == "true" else "recompute"] = {"summary": summary, "kv": kv, "rows": rows}
        print(f"reuse={reuse}: {json.dumps(summary)}\n  kv: {json.dumps(kv)}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    on, off = result["runs"]["reuse"], result["runs"]["recompute"]
    kv = on["kv"]
    print(f"""
| | KV reuse | recompute |
|---|---|---|
| follow-up TTFT p50 (ms) | {on['summary']['follow_up_ttft_p50_ms']:.0f} | {off['summary']['follow_up_ttft_p50_ms']:.0f} |
| TTFT at 800-1300 tokens of history, mean (ms) | {on['summary']['ttft_at_1k_mean_ms']:.0f} | {off['summary']['ttft_at_1k_mean_ms']:.0f} |
| prefill tokens saved, all turns | {on['summary']['prefill_saved_pct']:.1f}% | {off['summary']['prefill_saved_pct']:.1f}% |
| prefill tokens saved, follow-up turns | {on['summary']['follow_up_saved_pct']:.1f}% | {off['summary']['follow_up_saved_pct']:.1f}% |
| longest prompt (tokens) | {on['summary']['max_prompt_tokens']} | {off['summary']['max_prompt_tokens']} |

KV store: hit rate {kv['hits'] / max(1, kv['hits'] + kv['misses']):.0%} ({kv['hits']} hits, {kv['misses']} misses),
{kv['bytes_per_token']} bytes per token, {kv['bytes_used'] / 2**20:.0f} MiB held in {kv['entries']} entries,
save {kv['save_ms'] / max(1, kv['saves']):.1f} ms per entry, restore {kv['restore_ms'] / max(1, kv['restores']):.1f} ms per hit.
TTFT speed-up at ~1k tokens of history: {off['summary']['ttft_at_1k_mean_ms'] / on['summary']['ttft_at_1k_mean_ms']:.1f}x.""")


if __name__ == "__main__":
    main()
