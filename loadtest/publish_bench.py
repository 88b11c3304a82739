"""What publishing one generated token costs, on each side of Redis, without a model:

* worker: ``gpu_worker.io.Publisher``'s round trip for one engine step of ``--batch``
  requests (RPUSH to each output log, one PUBLISH, lifecycle bookkeeping), against a
  real redis-server; wall time (includes the Redis round trip) and this thread's CPU;
* API: what one API process does with such a step: ``TokenRelay.dispatch`` (decode,
  fan out to per-request queues), each request's ``Generation.events()`` (order,
  duplicates, metrics), the chat chunk rendering and ``sse_data`` (the SSE bytes);
  process CPU, in one event loop as in the API. HTTP framing (sse-starlette, uvicorn)
  is not included: ``loadtest.suite``'s overhead table measures the whole API process.

    python -m loadtest.publish_bench --batch 32 --steps 200 [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from types import SimpleNamespace

MODEL = "bench-model"


def requests(batch: int, steps: int, reply_to: str):
    from broker.messages import GenerateRequest, SamplingParams

    return [GenerateRequest(id=f"req-{i}", model=MODEL, prompt_token_ids=list(range(64)), reply_to=reply_to,
                            params=SamplingParams(max_tokens=steps), user=f"user-{i % 4}", created_at=time.time())
            for i in range(batch)]


def step_events(reqs, step: int, steps: int):
    """One engine step: one new token per request, about 4 characters of text each."""
    from broker.messages import TokenEvent

    last = step == steps - 1
    return [TokenEvent(r.id, 0, step, [1000 + step], text=" tok", finish_reason="length" if last else None)
            for r in reqs]


def worker_side(batch: int, steps: int) -> dict:
    from broker import keys
    from broker.connection import sync_client
    from gpu_worker.engine import Outgoing
    from gpu_worker.io import Publisher
    from inferstack.redis_server import RedisServer
    from metrics.lifecycle import Claim
    from scheduler.queue import FairQueue
    from scheduler.settings import SchedulerSettings

    server = RedisServer()
    try:
        client = sync_client(server.url)
        fq = FairQueue(client, SchedulerSettings())
        pub = Publisher(client, fq, "bench-worker", on_error=lambda exc: None)
        reqs = requests(batch, steps, keys.reply_channel("bench-api"))
        pub._ship([Claim(MODEL, r, 1, batch, time.time()) for r in reqs])  # noqa: SLF001 - the thread's body
        wall = cpu = 0.0
        for step in range(steps):
            out = [Outgoing(MODEL, r.reply_to, r.id, ev, request_done=ev.finish_reason is not None)
                   for r, ev in zip(reqs, step_events(reqs, step, steps))]
            w0, c0 = time.perf_counter(), time.thread_time()
            pub._ship(out)  # noqa: SLF001
            wall += time.perf_counter() - w0
            cpu += time.thread_time() - c0
        tokens = batch * steps
        return {"tokens": tokens, "publish_ms_per_token": round(1000 * wall / tokens, 4),
                "publish_cpu_ms_per_token": round(1000 * cpu / tokens, 4)}
    finally:
        server.stop()


class _AdmitAll:
    async def enqueue(self, req, **kw):
        from scheduler.queue import Admission

        return Admission(True)


async def api_side(batch: int, steps: int) -> dict:
    from api.generation import Generation
    from api.relay import TokenRelay
    from api.routes._text import sse_data
    from api.routes.chat import ChatChunks
    from broker import messages
    from scheduler.settings import SchedulerSettings

    relay = TokenRelay("redis://127.0.0.1:1/0", "bench-api")  # never started: fed by dispatch()
    state = SimpleNamespace(relay=relay, sched=SchedulerSettings(), events=None, queue=_AdmitAll())
    reqs = requests(batch, steps, relay.channel)
    payloads = [messages.encode_batch(step_events(reqs, s, steps)) for s in range(steps)]  # what PUBLISH carries
    gens = [Generation(state, r) for r in reqs]
    for g in gens:
        await g.admit()
    sent = [0]

    async def client(gen: Generation) -> None:
        chunks = ChatChunks({"id": gen.req.id, "created": 0, "model": MODEL, "system_fingerprint": None}, 64, True)
        async for ev in gen.events():
            for chunk in chunks.render(0, ev):
                sent[0] += len(sse_data(chunk))
        for chunk in chunks.finish():
            sent[0] += len(sse_data(chunk))

    tasks = [asyncio.create_task(client(g)) for g in gens]
    await asyncio.sleep(0)
    w0, c0 = time.perf_counter(), time.process_time()
    for payload in payloads:
        relay.dispatch(payload)
        await asyncio.sleep(0)  # the listener yields to the request tasks between messages
    await asyncio.gather(*tasks)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    for g in gens:
        g.close()
    tokens = batch * steps
    return {"tokens": tokens, "api_ms_per_token": round(1000 * wall / tokens, 4),
            "api_cpu_ms_per_token": round(1000 * cpu / tokens, 4), "sse_bytes_per_token": round(sent[0] / tokens, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="requests per engine step")
    ap.add_argument("--steps", type=int, default=200, help="engine steps (tokens per request)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per side")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    worker = min((worker_side(args.batch, args.steps) for _ in range(args.repeats)),
                 key=lambda r: r["publish_cpu_ms_per_token"])
    api = min((asyncio.run(api_side(args.batch, args.steps)) for _ in range(args.repeats)),
              key=lambda r: r["api_cpu_ms_per_token"])
    result = {"batch": args.batch, "steps": args.steps, "worker": worker, "api": api}
    print(f"worker publisher: {worker['publish_ms_per_token']:.4f} ms/token wall (with the Redis round trip), "
          f"{worker['publish_cpu_ms_per_token']:.4f} ms/token CPU")
    print(f"API relay -> SSE bytes: {api['api_cpu_ms_per_token']:.4f} ms/token CPU "
          f"({api['sse_bytes_per_token']:.0f} SSE bytes/token)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
