"""Stall and recovery times under faults, measured on real processes:

    python -m loadtest.faults --out loadtest/results/faults.json

It starts an append-only redis-server, the API and two workers (default heartbeat
and failover settings) with SmolLM2-135M, and runs C greedy streams per scenario:

* ``worker_kill``: kill -9 the worker that holds the streams mid-generation; the
  other one takes them over. Stall = the longest gap between two chunks of a stream
  (the same stream's typical gap is reported beside it).
* ``redis_restart``: shut Redis down (AOF synced), start it again ``--redis-down-s``
  later. Stall as above; "recovered" = from Redis answering again to each stream's
  next chunk, and to the first new request answered.
* ``client_resume``: a client drops its stream and resumes it on the same API
  process; "resume latency" = from the GET to its first chunk.
* ``exporter_kill``: kill -9 the metrics exporter (chDB) mid-stream, start it again
  once the streams are done. Stall as above (the streams should not notice);
  "recovered" = from the restart to every event before it exported (the consumer
  group's last delivery past them, none pending), then each stream's request row is
  checked: finished, with every token counted.

Every faulted stream's text is compared with an undisturbed run's; a mismatch, an
error event or an incomplete request row is reported as such (and fails the run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import redis

from broker import keys
from inferstack.redis_server import RedisServer, free_port
from loadtest import bench
from loadtest.prompts import chat_prompt

MODEL = "smollm2-135m"


class Procs:
    """The API, workers and (on request) the exporter as child processes on one Redis."""

    def __init__(self, redis_url: str, workers: int = 1, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "INFERSTACK_REDIS_URL": redis_url, "INFERSTACK_PORT": str(self.port),
                    "INFERSTACK_WORKER_MODELS": MODEL, "INFERSTACK_LOG_LEVEL": "WARNING", **(extra_env or {})}
        self.api = self._spawn("api")
        self.workers = [self._spawn("worker") for _ in range(workers)]
        self.exporter: subprocess.Popen | None = None
        self.wait_ready(workers)

    def _spawn(self, what: str, **env) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inferstack.cli", what], env={**self.env, **env})

    def add_worker(self, **env) -> subprocess.Popen:
        p = self._spawn("worker", **env)
        self.workers.append(p)
        return p

    def kill_worker(self, worker: subprocess.Popen) -> None:
        """kill -9, as a crash: no shutdown, no release of what it holds."""
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        self.workers.remove(worker)

    def start_exporter(self, **env) -> subprocess.Popen:
        self.exporter = self._spawn("exporter", **env)
        return self.exporter

    def wait_ready(self, workers: int = 1, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited with {self.api.returncode}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                if r.status_code == 200 and r.json()["workers"] >= workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the stack did not become ready")

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["INFERSTACK_REDIS_URL"], decode_responses=True)

    def busiest_worker(self) -> subprocess.Popen:
        """The worker process holding the most requests now (from the heartbeats)."""
        with self.redis_client() as r:
            running = {}
            for wid in r.zrange(keys.WORKERS, 0, -1):
                info = r.hgetall(keys.worker(wid))
                if info:
                    running[int(info["pid"])] = sum(json.loads(info.get("running", "{}")).values())
        return max((p for p in self.workers if p.pid in running), key=lambda p: running[p.pid])

    def reclaimed(self, since: float) -> dict[str, float]:
        """Request id -> unix time another worker claimed it again (attempt > 1), for the
        claims since unix time ``since`` (the workers' lifecycle events)."""
        with self.redis_client() as r:
            return {f["request_id"]: float(f["ts"]) for _, f in r.xrange(keys.EVENTS) if f["kind"] == "claimed"
                    and int(f.get("attempt", 1)) > 1 and float(f["ts"]) >= since}

    def exported_up_to(self, last_id: str) -> bool:
        """Whether the exporters have written (read and acknowledged) every lifecycle event
        up to stream id ``last_id``."""
        def key(entry_id: str) -> tuple[int, int]:
            ms, seq = entry_id.split("-")
            return int(ms), int(seq)

        with self.redis_client() as r:
            try:
                group = next(g for g in r.xinfo_groups(keys.EVENTS) if g["name"] == keys.EVENTS_GROUP)
            except (StopIteration, redis.ResponseError):
                return False
            pending = r.xpending_range(keys.EVENTS, keys.EVENTS_GROUP, min="-", max=last_id, count=1)
        return key(group["last-delivered-id"]) >= key(last_id) and not pending

    def warm_up(self, rounds: int = 10) -> None:
        """Until every worker has generated something: a worker's first forward pass is
        slow (kernels, allocations), and a cold standby would inflate the failover stall."""
        for i in range(rounds):
            with self.redis_client() as r:
                cold = [w for w in r.zrange(keys.WORKERS, 0, -1)
                        if float(r.hget(keys.worker(w), "tokens_generated") or 0) == 0]
            if not cold:
                return
            for run in [Run(self.url, k, 4) for k in range(2 * len(self.workers))]:
                run.join()
            time.sleep(1.0)  # a heartbeat or two
        print("warning: a worker is still cold after the warm-up", flush=True)

    def stop(self) -> None:
        procs = [*self.workers, self.api, *([self.exporter] if self.exporter else [])]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()  # reaped: no zombie, no ResourceWarning from its Popen


class Run:
    """One greedy stream read in a thread: chunk arrival times, text, ids, errors."""

    def __init__(self, url: str, i: int, max_tokens: int, *, limit: int | None = None,
                 resume: tuple[str, str] | None = None):
        """``limit``: hang up after that many events; ``resume``: (response id, last event
        id) to read the rest of a dropped stream instead of sending a new request."""
        self.url, self.i, self.max_tokens, self.limit, self.resume = url, i, max_tokens, limit, resume
        self.started = time.monotonic()
        self.times: list[float] = []
        self.text: list[str] = []
        self.ids: list[str] = []
        self.errors: list[dict] = []
        self.response_id = ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def body(self) -> dict:
        return {"model": MODEL, "messages": chat_prompt(self.i), "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "user": "faults"}

    def _read(self) -> None:
        if self.resume:
            rid, last = self.resume
            request = dict(method="GET", url=f"{self.url}/v1/chat/completions/{rid}/stream",
                           params={"user": "faults"}, headers={"Last-Event-ID": last})
        else:
            request = dict(method="POST", url=f"{self.url}/v1/chat/completions", json=self.body())
        with httpx.stream(timeout=300, **request) as r:
            self._consume(r)

    def _consume(self, r) -> None:
        event_id = None
        for line in r.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                self.times.append(time.monotonic())
                self.ids.append(event_id)
                if line == "data: [DONE]":
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self.errors.append(chunk["error"])
                    continue
                self.response_id = chunk["id"]
                for c in chunk["choices"]:
                    self.text.append(c["delta"].get("content") or "")
                if self.limit and len(self.times) >= self.limit:
                    return

    def join(self) -> "Run":
        self.thread.join(600)
        return self

    def wait_chunks(self, n: int) -> None:
        deadline = time.monotonic() + 300
        while len(self.times) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("the stream did not start")
            time.sleep(0.02)

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def stalls(runs: list[Run], reference: dict[int, str]) -> dict:
    gaps = [g for r in runs for g in r.gaps]
    return {
        "streams": len(runs),
        "stall_s": round(max(max(r.gaps) for r in runs), 3),
        "typical_gap_s": round(statistics.median(gaps), 3),
        "identical_text": all("".join(r.text) == reference[r.i] for r in runs),
        "errors": [e for r in runs for e in r.errors],
    }


def worker_kill(procs: Procs, reference: dict[int, str], c: int, max_tokens: int) -> dict:
    runs = [Run(procs.url, i, max_tokens) for i in range(c)]
    for r in runs:
        r.wait_chunks(6)
    victim = procs.busiest_worker()  # both may hold some
    killed_at, killed_wall = time.monotonic(), time.time()
    procs.kill_worker(victim)
    for r in runs:
        r.join()
    out = stalls(runs, reference)
    out["first_chunk_after_kill_s"] = round(max(
        min((t for t in r.times if t > killed_at), default=float("nan")) - killed_at for r in runs), 3)
    # When another worker claimed them again (its lifecycle events): detection + claim.
    reclaims = procs.reclaimed(killed_wall)
    out["reclaimed_after_kill_s"] = round(max(reclaims.values()) - killed_wall, 3) if reclaims else None
    return out


def redis_restart(procs: Procs, server: RedisServer, reference: dict[int, str], c: int, max_tokens: int,
                  down_s: float) -> dict:
    runs = [Run(procs.url, i, max_tokens) for i in range(c)]
    for r in runs:
        r.wait_chunks(6)
    server.shutdown()
    time.sleep(down_s)
    server.start()
    back = time.monotonic()
    first_new, attempts = None, []
    while first_new is None and time.monotonic() - back < 120:
        sent = time.monotonic()
        try:
            r = httpx.post(f"{procs.url}/v1/chat/completions", timeout=60, json={
                "model": MODEL, "messages": chat_prompt(99), "max_tokens": 1})
            attempts.append((round(sent - back, 3), r.status_code, round(time.monotonic() - sent, 3)))
            if r.status_code == 200:
                first_new = time.monotonic() - back
        except httpx.HTTPError as exc:
            attempts.append((round(sent - back, 3), type(exc).__name__, round(time.monotonic() - sent, 3)))
        if first_new is None:
            time.sleep(0.1)
    for r in runs:
        r.join()
    out = stalls(runs, reference)
    out["down_s"] = down_s
    out["next_chunk_after_redis_back_s"] = round(max(
        min((t for t in r.times if t > back), default=float("nan")) - back for r in runs), 3)
    out["first_new_request_after_redis_back_s"] = round(first_new, 3) if first_new is not None else None
    out["new_request_attempts"] = attempts  # (sent after Redis was back, status, took) each
    return out


def client_resume(procs: Procs, reference: dict[int, str], max_tokens: int, repeats: int) -> dict:
    latencies, identical = [], []
    for k in range(repeats):
        k %= len(reference)
        head = Run(procs.url, k, max_tokens, limit=5).join()
        tail = Run(procs.url, k, max_tokens, resume=(head.response_id, head.ids[-1])).join()
        latencies.append(tail.times[0] - tail.started)
        identical.append("".join(head.text + tail.text) == reference[k] and not tail.errors)
    return {"resumes": repeats, "resume_latency_p50_s": round(statistics.median(latencies), 3),
            "resume_latency_max_s": round(max(latencies), 3), "identical_text": all(identical)}


def exporter_kill(procs: Procs, reference: dict[int, str], c: int, max_tokens: int, chdb: str) -> dict:
    def caught_up(timeout_s: float = 300) -> float:
        """Seconds until every lifecycle event emitted so far is exported."""
        with procs.redis_client() as r:
            last = r.xinfo_stream(keys.EVENTS)["last-generated-id"]
        started = time.monotonic()
        while not procs.exported_up_to(last):
            if time.monotonic() - started > timeout_s:
                raise RuntimeError("the exporter did not catch up")
            time.sleep(0.1)
        return time.monotonic() - started

    exporter = procs.start_exporter(INFERSTACK_CHDB_PATH=chdb)
    caught_up()
    runs = [Run(procs.url, i, max_tokens) for i in range(c)]
    for r in runs:
        r.wait_chunks(6)
    os.kill(exporter.pid, signal.SIGKILL)
    exporter.wait()
    for r in runs:
        r.join()
    out = stalls(runs, reference)
    restarted = procs.start_exporter(INFERSTACK_CHDB_PATH=chdb)  # same consumer name: re-reads its pending
    out["exported_all_after_restart_s"] = round(caught_up(), 3)
    restarted.terminate()  # chDB: one process at a time on its directory
    restarted.wait(30)
    procs.exporter = None
    from metrics.store import ChdbStore

    store = ChdbStore(chdb)
    try:
        ids = {r.response_id for r in runs}
        rows = [row for row in store.query("SELECT request_id, status, completion_tokens FROM requests")
                if row["request_id"] in ids]
    finally:
        store.close()
    out["rows_complete"] = (len(rows) == len(ids)
                            and all(row["status"] == "finished" and row["completion_tokens"] == max_tokens
                                    for row in rows))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--redis-down-s", type=float, default=3.0)
    ap.add_argument("--resumes", type=int, default=3)
    ap.add_argument("--scenarios", default="worker_kill,redis_restart,client_resume,exporter_kill")
    ap.add_argument("--out", default="loadtest/results/faults.json")
    args = ap.parse_args(argv)
    scenarios = args.scenarios.split(",")
    server = RedisServer(appendonly=True)
    procs = Procs(server.url, workers=2, extra_env={"INFERSTACK_DTYPE": "float32"})  # batch-invariant: see test_faults
    result = {"machine": bench.machine(), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "load_average": os.getloadavg()}
    try:
        procs.warm_up()
        print("reference run (no fault) ...", flush=True)
        runs = [Run(procs.url, i, args.max_tokens) for i in range(args.concurrency)]
        reference = {r.i: "".join(r.join().text) for r in runs}
        if "worker_kill" in scenarios:
            print("kill -9 a worker mid-stream ...", flush=True)
            result["worker_kill"] = worker_kill(procs, reference, args.concurrency, args.max_tokens)
        if "redis_restart" in scenarios:
            print(f"redis restart ({args.redis_down_s:g} s down) ...", flush=True)
            result["redis_restart"] = redis_restart(procs, server, reference, args.concurrency, args.max_tokens,
                                                    args.redis_down_s)
        if "client_resume" in scenarios:
            print("client drops and resumes ...", flush=True)
            result["client_resume"] = client_resume(procs, reference, args.max_tokens, args.resumes)
        if "exporter_kill" in scenarios:
            print("kill -9 the exporter mid-stream ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="faults-chdb-") as chdb:
                result["exporter_kill"] = exporter_kill(procs, reference, args.concurrency, args.max_tokens, chdb)
    finally:
        procs.stop()
        server.stop()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    ok = all(result[k]["identical_text"] and not result[k].get("errors") and result[k].get("rows_complete", True)
             for k in scenarios)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
