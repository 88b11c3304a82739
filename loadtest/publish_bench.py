"""What publishing one generated token costs, on each side of Redis, without a model:

* worker: ``gpu_worker.io.Publisher``'s round trip for one engine step of ``--batch``
  requests (RPUSH to each output log, one PUBLISH, lifecycle bookkeeping), against a
  real redis-server; wall time (includes the Redis round trip) and this thread's CPU;
* API: what one API process does with such a step: ``TokenRelay.dispatch`` (decode,
  fan out to per-request queues), each request's ``Generation.events()`` (order,
  duplicates, metrics), the chat chunk rendering and ``sse_data`` (the SSE bytes);
  process CPU, in one event loop as in the API. HTTP framing (sse-starlette, uvicorn)
  is not included here;
* ``--http``: the whole path through real processes minus the model (the API process
  with uvicorn and sse-starlette, a worker whose engine emits scripted tokens, Redis,
  streaming clients): CPU per token of the API process and of redis-server.

    python -m loadtest.publish_bench --batch 32 --steps 200 [--http] [--json out.json]
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
        chunks = ChatChunks(gen.req.id, {"created": 0, "model": MODEL, "prompt_tokens": 64, "include_usage": True})
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


class ScriptedEngine:
    """A text engine without a model: every step (``step_s`` apart, like a forward pass)
    each held request gets one more token of fixed text, up to its ``max_tokens``."""

    def __init__(self, model: str, step_s: float, max_batch: int):
        import threading

        self.model, self.step_s, self.max_batch = model, step_s, max_batch
        self._lock = threading.Lock()
        self._inbox: list = []
        self._held: dict[str, list] = {}  # id -> [request, tokens sent]
        self.tokens_generated = 0

    def capacity(self) -> int:
        with self._lock:
            return max(0, self.max_batch - len(self._held) - len(self._inbox))

    def add(self, claimed, log_events) -> None:
        with self._lock:
            self._inbox.append(claimed.request)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._held.pop(request_id, None)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._held)

    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._held) + [r.id for r in self._inbox]

    def step(self, emit) -> None:
        from broker.messages import TokenEvent
        from gpu_worker.engine import Outgoing

        time.sleep(self.step_s)
        out = []
        with self._lock:
            for req in self._inbox:
                self._held[req.id] = [req, 0]
            self._inbox.clear()
            for rid, state in list(self._held.items()):
                req, n = state
                done = n + 1 >= req.params.max_tokens
                out.append(Outgoing(self.model, req.reply_to, rid, TokenEvent(
                    rid, 0, n, [1000 + n % 7], text=" tok", finish_reason="length" if done else None),
                    request_done=done))
                state[1] = n + 1
                if done:
                    del self._held[rid]
        self.tokens_generated += len(out)
        emit(out)

    def fail_all(self, message: str, emit) -> None:
        with self._lock:
            self._held.clear()
            self._inbox.clear()

    def gauges(self) -> dict[str, float]:
        return {"batch_size": len(self._held), "kv_cache_bytes": 0}


def _scripted_worker(redis_url: str, model: str, step_s: float, max_batch: int) -> None:
    """A worker process serving ``model`` with a :class:`ScriptedEngine` until SIGTERM."""
    import signal

    import torch

    from gpu_worker.settings import WorkerSettings
    from gpu_worker.worker import Worker
    from scheduler.settings import SchedulerSettings

    settings = WorkerSettings(redis_url=redis_url, worker_models=model, worker_serves=model, heartbeat_s=0.5)
    worker = Worker(settings, SchedulerSettings(redis_url=redis_url), {model: ScriptedEngine(model, step_s, max_batch)},
                    torch.device("cpu"))
    signal.signal(signal.SIGTERM, lambda *_: (worker.request_stop(), worker.request_stop()))
    worker.run()


def http_side(concurrency: int, requests_per_client: int, max_tokens: int, step_s: float, model: str) -> dict:
    """The whole path through real processes, minus the model: the API (uvicorn and
    sse-starlette included), a worker whose engine is a :class:`ScriptedEngine`, real
    Redis, streaming HTTP clients in this process. CPU per token of the API process is
    what ``loadtest.suite`` reports as "API process CPU", here without model noise; the
    worker process's CPU per token is almost all publishing."""
    import multiprocessing
    import os
    import subprocess
    import sys

    import httpx
    import psutil
    import redis

    from inferstack.redis_server import RedisServer, free_port
    from loadtest import bench
    from loadtest.suite import worker_counters

    server = RedisServer()
    port = free_port()
    env = {**os.environ, "INFERSTACK_REDIS_URL": server.url, "INFERSTACK_PORT": str(port),
           "INFERSTACK_LOG_LEVEL": "WARNING"}
    api = subprocess.Popen([sys.executable, "-m", "inferstack.cli", "api"], env=env)
    worker = multiprocessing.get_context("spawn").Process(
        target=_scripted_worker, args=(server.url, model, step_s, concurrency), daemon=True)
    worker.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or api.poll() is not None or not worker.is_alive():
                raise RuntimeError("the API or the worker did not become ready")
            time.sleep(0.2)
        procs = [psutil.Process(p) for p in (api.pid, worker.pid, server.proc.pid)]
        r = redis.Redis.from_url(server.url, decode_responses=True)
        asyncio.run(bench.run_stack(url, model, 1, 4, 1))  # warm-up
        time.sleep(1.2)  # a heartbeat carries the counters

        def snapshot():
            return [sum(p.cpu_times()[:2]) for p in procs], worker_counters(r)

        (cpu0, w0) = snapshot()
        res = asyncio.run(bench.run_stack(url, model, concurrency, max_tokens, requests_per_client))
        time.sleep(1.2)
        (cpu1, w1) = snapshot()
        tokens = w1["tokens_generated"] - w0["tokens_generated"]
        per = [round(1000 * (b - a) / tokens, 4) for a, b in zip(cpu0, cpu1)]
        return {"concurrency": concurrency, "max_tokens": max_tokens, "step_ms": 1000 * step_s,
                "requests": res.requests, "errors": res.errors, "tokens": tokens,
                "api_process_cpu_ms_per_token": per[0], "worker_process_cpu_ms_per_token": per[1],
                "redis_cpu_ms_per_token": per[2],
                "publisher_busy_ms_per_token": round(1000 * (w1["publish_busy_s"] - w0["publish_busy_s"]) / tokens, 4)}
    finally:
        worker.terminate()
        worker.join(15)
        api.terminate()
        api.wait(15)
        server.stop()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="requests per engine step")
    ap.add_argument("--steps", type=int, default=200, help="engine steps (tokens per request)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per side")
    ap.add_argument("--http", action="store_true",
                    help="also the whole path: API process + worker (scripted engine) + clients")
    ap.add_argument("--http-concurrency", type=int, default=32)
    ap.add_argument("--http-max-tokens", type=int, default=64)
    ap.add_argument("--http-requests-per-client", type=int, default=4)
    ap.add_argument("--step-ms", type=float, default=20.0, help="the scripted engine's step time")
    ap.add_argument("--model", default="smollm2-135m", help="registry model (the API loads its tokenizer)")
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
    if args.http:
        result["http"] = http_side(args.http_concurrency, args.http_requests_per_client, args.http_max_tokens,
                                   args.step_ms / 1000, args.model)
        h = result["http"]
        print(f"whole path, c={h['concurrency']}, {h['max_tokens']} tokens/request: API process "
              f"{h['api_process_cpu_ms_per_token']:.4f} ms/token CPU, worker process "
              f"{h['worker_process_cpu_ms_per_token']:.4f} (publisher busy {h['publisher_busy_ms_per_token']:.4f}), "
              f"redis-server {h['redis_cpu_ms_per_token']:.4f} ({h['errors']} errors)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
