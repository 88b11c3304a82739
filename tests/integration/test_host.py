"""The host supervisor (``inferstack host``) with real worker processes on the tiny
model, two CPU "devices" and a real redis-server: mode switches through the admin API
while clients keep streaming, and tensor-parallel ranks killed mid-stream. Nothing may
fail, and every answer must be the one an undisturbed run gives (greedy decoding:
same prompt, same text), so a request handed back mid-stream resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import redis

from broker import keys
from broker.messages import decode_heartbeat
from inferstack.host import HostSettings, HostSupervisor
from tests.stack import ApiThread
from tests.tiny import registry_toml

# Five sets of worker processes start in turn (each imports torch and transformers:
# ~10 s on a quiet 2-core host, a minute at load 12).
pytestmark = pytest.mark.timeout(900)

HOST = "test-host"
PROMPTS = [f"Hello world number {i}" for i in range(4)]


class ClosedLoop:
    """Each client streams a greedy chat completion, then the next, until stopped."""

    def __init__(self, url: str, clients: int = 4, max_tokens: int = 64):
        self.url, self.max_tokens = url, max_tokens
        self.answers: dict[str, set[str]] = {}
        self.failures: list[str] = []
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(PROMPTS[i % len(PROMPTS)],), daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, prompt: str) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "stream": True,
                "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        while not self._stop.is_set():
            text, finish, events = "", None, []
            try:
                with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.status_code} {r.read()[:300]!r}")
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                for e in events[:-1]:
                    chunk = json.loads(e)
                    if "error" in chunk:
                        raise RuntimeError(f"error event {chunk['error']}")
                    for c in chunk["choices"]:
                        text += c["delta"].get("content") or ""
                        finish = c.get("finish_reason") or finish
                if events[-1:] != ["[DONE]"] or finish != "length":
                    raise RuntimeError(f"stream ended without [DONE] or finish: {events[-2:]}")
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none may happen
                with self._lock:
                    self.failures.append(f"{prompt}: {exc}")
                continue
            with self._lock:
                self.answers.setdefault(prompt, set()).add(text)
                self.done += 1

    def wait_for(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        target = self.done + n
        while self.done < target:
            assert time.monotonic() < deadline, f"only {self.done} requests done; failures {self.failures[:3]}"
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(150)


@pytest.fixture
def host_stack(redis_url, tiny_model_dir, tmp_path):
    """An API and a host supervisor with two CPU devices; yields a function starting
    the supervisor in a mode (individual, or tp on the tiny model)."""
    from api.settings import ApiSettings
    from inferstack.redis_server import free_port
    from scheduler.settings import SchedulerSettings

    models = registry_toml(tmp_path / "models.toml", tiny_model_dir)
    with open(models, "a") as f:  # the same weights, registered as needing a two-device group
        f.write(f'\n[models.wide]\nmodality = "text"\npath = "{tiny_model_dir}"\ntensor_parallel = 2\n')
    sched = SchedulerSettings(redis_url=redis_url, lease_s=3)
    api = ApiThread(ApiSettings(redis_url=redis_url, models_file=models, cache_dir=tmp_path / "cache",
                                port=free_port()), sched)
    env = {**os.environ, "INFERSTACK_REDIS_URL": redis_url, "INFERSTACK_MODELS_FILE": str(models),
           "INFERSTACK_CACHE_DIR": str(tmp_path / "cache"), "INFERSTACK_WORKER_MODELS": "tiny",
           "INFERSTACK_HEARTBEAT_S": "0.2", "INFERSTACK_LEASE_S": "3", "INFERSTACK_LOG_LEVEL": "WARNING",
           # no time to finish: whatever runs at a switch goes back to the queue mid-stream
           "INFERSTACK_DRAIN_TIMEOUT_S": "0", "INFERSTACK_TP_TIMEOUT_S": "20", "INFERSTACK_KV_REUSE": "false"}
    started: list[tuple[HostSupervisor, threading.Thread]] = []

    def start(**kw) -> HostSupervisor:
        settings = HostSettings(redis_url=redis_url, models_file=models, host_id=HOST, host_devices="cpu,cpu",
                                heartbeat_s=0.2, drain_timeout_s=0, start_timeout_s=120, **kw)
        supervisor = HostSupervisor(settings, env=env)
        thread = threading.Thread(target=supervisor.run, daemon=True)  # it owns the workers: keep it alive
        thread.start()
        started.append((supervisor, thread))
        wait_host(redis_url, lambda h: h["state"] == "ready")
        return supervisor

    yield api.url, start
    for supervisor, thread in started:
        supervisor.stop()
        thread.join(60)
    api.stop()


def wait_host(redis_url: str, ready, timeout: float = 180) -> dict:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            raw = client.hgetall(keys.host(HOST))
            status = decode_heartbeat(raw) if raw else None
            if status and ready(status):
                return status
            assert time.monotonic() < deadline, f"host not there in time: {status}"
            time.sleep(0.1)
    finally:
        client.close()


def resumed_claims(redis_url: str) -> int:
    """Claims of requests that had been handed back (attempt > 1), from the lifecycle events."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sum(1 for _, f in client.xrange(keys.EVENTS) if f.get("kind") == "claimed"
                   and int(f.get("attempt", 1)) > 1)
    finally:
        client.close()


def switch(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/admin/hosts/{HOST}/mode", json=body, timeout=30)
    assert r.status_code == 202, r.text
    change = r.json()
    deadline = time.monotonic() + 240
    while True:
        h = httpx.get(f"{url}/v1/admin/hosts/{HOST}", timeout=30).json()
        if h["command"] == change["id"] and h["command_state"] in ("done", "failed"):
            assert h["command_state"] == "done", h["error"]
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.2)


def test_switches_and_a_dead_rank_under_closed_loop_load_lose_nothing(host_stack, redis_url):
    """Individual workers -> a TP group -> its follower rank killed (the group goes
    down and comes back) -> individual again, with four clients streaming all along."""
    url, start = host_stack
    start()
    workers = httpx.get(f"{url}/v1/admin/workers", timeout=30).json()["data"]
    assert sorted((w["mode"], w["devices"][0]) for w in workers) == [("individual", "cpu"), ("individual", "cpu")]
    load = ClosedLoop(url)
    load.wait_for(4)

    h = switch(url, {"mode": "tp", "model": "tiny", "size": 2})
    assert h["mode"] == "tp" and [u["kind"] for u in h["units"]] == ["tp"]
    workers = httpx.get(f"{url}/v1/admin/workers", timeout=30).json()["data"]
    assert [(w["mode"], w["tp_size"], w["devices"], w["models"]) for w in workers] == [
        ("tp", 2, ["cpu", "cpu"], ["tiny"])]
    load.wait_for(4)

    group = h["units"][0]
    os.kill(group["pids"][1], signal.SIGKILL)  # rank 1: rank 0 notices, hands back, exits
    h = wait_host(redis_url, lambda h: h["units"][0]["restarts"] > group["restarts"]
                  and h["units"][0]["state"] == "ready")
    assert -signal.SIGKILL in h["units"][0]["last_exits"]
    load.wait_for(4)

    h = switch(url, {"mode": "individual"})
    assert h["mode"] == "individual" and len(h["units"]) == 2
    load.wait_for(4)
    load.stop()

    assert load.failures == []
    assert all(len(texts) == 1 for texts in load.answers.values()), load.answers  # resumed streams are exact
    assert resumed_claims(redis_url) >= 1, "no request was running at a switch or the rank's death"

    # A model that needs two devices: refused by individual workers, served once a group runs it.
    chat = {"model": "wide", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    assert "wide" not in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_capable_worker"
    switch(url, {"mode": "tp", "model": "wide"})
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]] == ["wide"]
    r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
