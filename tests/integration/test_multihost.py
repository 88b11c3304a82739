"""Several hosts, simulated on one machine: three API processes, three worker processes
and the metrics exporter, all real processes, over a real Redis Cluster, serving two
models (the tiny one under two names) whose queues sit on different primaries.

Under a steady load of streamed requests spread over the three APIs, a worker is
killed with -9, the primary holding one model's queue (and the lifecycle event stream)
is failed over gracefully, and the primary holding the other model's queue is killed
with -9.

What must hold:
* every request a client sent was admitted or refused with 429; every admitted one
  either completed exactly once (``[DONE]``, every token once: as many as asked for,
  none missing, none repeated) or ended with an error event (or, not started before
  its deadline, an OpenAI-shaped 503); none hung (the client's timeout would say so),
  none was cut silently;
* the exporter wrote exactly one row per request (each request has a user of its
  own), saying what the client saw, with the tokens it got.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from broker.connection import sync_client
from inferstack.procs import spawn_owned
from inferstack.redis_server import free_port
from metrics.store import ChdbStore
from scheduler import keys as qkeys
from tests.stream_outcome import chat
from tests.tiny import TWO_SLOTS

MODELS = TWO_SLOTS  # the tiny model under two names, on different primaries
MAX_TOKENS = 48
DEADLINE_S = 20
CLIENTS = 6


class Processes:
    """The deployment: each component a process of its own, as on separate hosts."""

    def __init__(self, cluster_url: str, models_file, tmp):
        self.env = {
            **os.environ, "INFERSTACK_REDIS_MODE": "cluster", "INFERSTACK_REDIS_URL": cluster_url,
            "INFERSTACK_MODELS_FILE": str(models_file), "INFERSTACK_CACHE_DIR": str(tmp / "cache"),
            "INFERSTACK_WORKER_MODELS": ",".join(MODELS), "INFERSTACK_HEARTBEAT_S": "0.5", "INFERSTACK_LEASE_S": "3",
            "INFERSTACK_CHDB_PATH": str(tmp / "chdb"), "INFERSTACK_EXPORTER_FLUSH_S": "0.2",
            "INFERSTACK_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",  # three workers share two cores
        }
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.exporter = self._spawn("exporter")
        self.workers = [self._spawn("worker", INFERSTACK_WORKER_ID=f"w{i}") for i in range(3)]
        self.api_urls = []
        for _ in range(3):
            port = free_port()
            self._spawn("api", INFERSTACK_PORT=str(port))
            self.api_urls.append(f"http://127.0.0.1:{port}")

    def _spawn(self, what: str, **env) -> subprocess.Popen:
        with open(self.logs / f"{len(self.procs)}-{what}.log", "wb") as log:  # read them when it fails
            proc = spawn_owned([sys.executable, "-m", "inferstack.cli", what], env={**self.env, **env},
                               stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait_ready(self, timeout: float = 300) -> None:
        """Every API answers and sees all three workers (seven processes import torch and
        transformers at once: slow on two busy cores)."""
        deadline = time.monotonic() + timeout
        for url in self.api_urls:
            while True:
                assert all(p.poll() is None for p in self.procs), "a process exited during start-up"
                try:
                    r = httpx.get(f"{url}/ready", timeout=2)
                    if r.status_code == 200 and r.json()["workers"] == 3:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the deployment did not come up"
                time.sleep(0.3)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Load:
    """``CLIENTS`` threads streaming requests, round robin over APIs and models, each
    request with a user of its own, until stopped."""

    def __init__(self, api_urls: list[str]):
        self.api_urls = api_urls
        self.results: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            with self._lock:
                k = len(self.results)
                out = {"user": f"client{i}-{n}", "sent_at": time.monotonic(), "api": self.api_urls[k % 3]}
                self.results.append(out)
            chat(out["api"], MODELS[k % 2], MAX_TOKENS, out, user=out["user"], deadline_s=DEADLINE_S,
                 timeout=DEADLINE_S + 60)
            n += 1

    def ended(self) -> int:
        return sum(1 for r in self.results if "end" in r)

    def stop(self) -> list[dict]:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.results


def wait_until(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_three_apis_three_workers_a_killed_worker_and_two_failovers(redis_cluster, cluster_target, two_models,
                                                                     tmp_path):
    events_home = redis_cluster.primary_of("is:events")
    graceful = redis_cluster.primary_of(qkeys.state(MODELS[0]))
    killed = redis_cluster.primary_of(qkeys.state(MODELS[1]))
    assert graceful == events_home != killed  # the slot split of MODELS makes it so
    deployment = Processes(cluster_target.url, two_models, tmp_path)
    load = None
    try:
        deployment.wait_ready()
        load = Load(deployment.api_urls)
        load.start()
        wait_until("the first requests to end", lambda: load.ended() >= 2 * CLIENTS)
        probe = sync_client(cluster_target)
        wait_until("the worker to kill to hold a request", lambda: any(
            probe.hget(qkeys.request(m, rid), "worker") == "w0" for m in MODELS for rid in probe.zrange(
                qkeys.leases(m), 0, -1)))
        probe.close()
        os.kill(deployment.workers[0].pid, signal.SIGKILL)
        wait_until("requests to end after the worker died", lambda: load.ended() >= 4 * CLIENTS)
        redis_cluster.failover(graceful)
        redis_cluster.kill_primary(killed)
        failed_over_at = time.monotonic()
        wait_until("requests to end after the failovers", lambda: sum(
            1 for r in load.results if r.get("end") == "done" and r["sent_at"] > failed_over_at) >= CLIENTS)
        results = load.stop()

        ends = [r["end"] for r in results]
        assert set(ends) <= {"done", "error", "refused"}, [r for r in results if r["end"] not in
                                                           ("done", "error", "refused")]
        for r in results:
            if r["end"] == "done":
                assert r["tokens"] == MAX_TOKENS, r  # exactly once: nothing missing, nothing repeated
        assert ends.count("done") >= len(ends) * 3 // 4, ends  # the failures cost little

        # One row per request, from the exporter process, saying what the client saw.
        store = ChdbStore(tmp_path / "chdb")
        users = {r["user"]: r for r in results}
        status = {"done": {"finished"}, "error": {"failed"}, "refused": {"rejected"}}

        def rows() -> list[dict]:
            return [row for row in store.query("SELECT * FROM requests") if row["user"] in users]

        def complete() -> bool:
            got = rows()
            return len(got) >= len(users) and all(row["status"] in status[users[row["user"]]["end"]] for row in got)

        wait_until("the exporter to write every request's row", complete)
        got = rows()
        assert sorted(row["user"] for row in got) == sorted(users)  # one row each, none twice
        for row in got:
            if users[row["user"]]["end"] == "done":
                assert row["completion_tokens"] == MAX_TOKENS, row
        assert any(row["attempts"] > 1 for row in got), "no request was running on the killed worker"
    finally:
        if load is not None:
            load.stop()
        deployment.stop()
        redis_cluster.heal()
