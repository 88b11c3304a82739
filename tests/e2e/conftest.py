"""The real stack as separate processes (API, worker) on the real SmolLM2-135M,
driven with the official openai SDK. One model load for the whole session."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from inferstack.redis_server import RedisServer, free_port

pytestmark = pytest.mark.e2e


class ProcStack:
    def __init__(self, redis_url: str, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "INFERSTACK_REDIS_URL": redis_url, "INFERSTACK_PORT": str(self.port),
                    "INFERSTACK_WORKER_MODELS": "smollm2-135m", "INFERSTACK_HEARTBEAT_S": "0.5",
                    "INFERSTACK_LEASE_S": "3", "INFERSTACK_LOG_LEVEL": "WARNING", **(extra_env or {})}
        self.api = self._spawn("api")
        self.workers = [self._spawn("worker")]
        self.exporter: subprocess.Popen | None = None
        self.wait_ready()

    def _spawn(self, what: str, **env) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "inferstack.cli", what], env={**self.env, **env})

    def add_worker(self, **env) -> subprocess.Popen:
        p = self._spawn("worker", **env)
        self.workers.append(p)
        return p

    def start_exporter(self, **env) -> subprocess.Popen:
        self.exporter = self._spawn("exporter", **env)
        return self.exporter

    def wait_ready(self, workers: int = 1, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in [self.api, *self.workers]:
                if p.poll() is not None and p in (self.api,):
                    raise RuntimeError(f"process exited with {p.returncode}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=2)
                if r.status_code == 200 and r.json()["workers"] >= workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("stack not ready")

    def stop(self):
        procs = [*self.workers, self.api, *([self.exporter] if self.exporter else [])]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="package")
def stack():
    """Its own redis-server, so that tests elsewhere flushing theirs never see this
    stack's heartbeats; torn down when the e2e package is done."""
    server = RedisServer()
    s = ProcStack(server.url)
    yield s
    s.stop()
    server.stop()


@pytest.fixture(scope="package")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)
