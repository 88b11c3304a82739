"""Prometheus: conventional names and label sets on the API's and a worker's
/metrics, several API processes counting into one scrape (multiprocess mode), and the
queue depth exported once, by the exporter, never by the API replicas."""

import os
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.messages import GenerateRequest, SamplingParams, Tier
from inferstack.redis_server import free_port
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings
from tests.stack import Stack

API_FAMILIES = {
    "inferstack_requests": ("counter", {"model", "tier", "status"}),
    "inferstack_prompt_tokens": ("counter", {"model"}),
    "inferstack_generation_tokens": ("counter", {"model"}),
    "inferstack_time_to_first_token_seconds": ("histogram", {"model"}),
    "inferstack_inter_token_latency_seconds": ("histogram", {"model"}),
    "inferstack_e2e_request_latency_seconds": ("histogram", {"model"}),
}
WORKER_FAMILIES = {
    "inferstack_queue_wait_seconds": ("histogram", {"model", "tier"}),
    "inferstack_worker_requests_claimed": ("counter", {"model"}),
    "inferstack_worker_requests_released": ("counter", {"model", "outcome"}),
    "inferstack_worker_generated_tokens": ("counter", {"model"}),
    "inferstack_engine_step_seconds": ("histogram", {"model"}),
    "inferstack_publish_round_trip_seconds": ("histogram", set()),
    "inferstack_batch_size": ("gauge", {"model"}),
    "inferstack_kv_cache_bytes": ("gauge", {"model"}),
    "inferstack_kv_store_bytes": ("gauge", {"model"}),
    "inferstack_kv_store_hits": ("counter", {"model"}),
    "inferstack_kv_store_misses": ("counter", {"model"}),
    "inferstack_kv_store_tokens_saved": ("counter", {"model"}),
    "inferstack_models_loaded": ("gauge", set()),
}


def scrape(url: str) -> dict:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict, sample_name: str, **labels) -> float:
    """Sum of the samples named ``sample_name`` with these labels (0 when none yet)."""
    return sum(s.value for f in families.values() for s in f.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def check_families(families: dict, expected: dict) -> None:
    for name, (kind, label_names) in expected.items():
        assert name in families, f"{name} missing"
        family = families[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == label_names, (name, sample)
            if kind == "counter":
                assert sample.name in (f"{name}_total", f"{name}_created")


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.2)


@pytest.fixture
def stack(redis_url, tiny_registry, tmp_path):
    s = Stack(redis_url, tiny_registry, tmp_path / "cache", worker_kw={"metrics_port": free_port()})
    yield s
    s.stop()


def test_api_and_worker_metrics_names_labels_and_counts(stack):
    worker_url = f"http://127.0.0.1:{stack.workers[0].worker.s.metrics_port}/metrics"
    before_api, before_worker = scrape(f"{stack.url}/metrics"), scrape(worker_url)
    r = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while True:  # the worker counts the release in its publisher thread, a moment after the reply
        api, worker = scrape(f"{stack.url}/metrics"), scrape(worker_url)
        released = value(worker, "inferstack_worker_requests_released_total", model="tiny", outcome="finished")
        if released > value(before_worker, "inferstack_worker_requests_released_total", model="tiny",
                             outcome="finished") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    check_families(api, API_FAMILIES)
    check_families(worker, WORKER_FAMILIES)

    def delta(after, before, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(api, before_api, "inferstack_requests_total", model="tiny", tier="normal", status="finished") == 1
    assert delta(api, before_api, "inferstack_generation_tokens_total", model="tiny") == 6
    assert delta(api, before_api, "inferstack_e2e_request_latency_seconds_count", model="tiny") == 1
    assert delta(api, before_api, "inferstack_time_to_first_token_seconds_count", model="tiny") == 1
    assert delta(worker, before_worker, "inferstack_worker_generated_tokens_total", model="tiny") == 6
    assert delta(worker, before_worker, "inferstack_queue_wait_seconds_count", model="tiny", tier="normal") == 1
    assert "inferstack_queue_depth" not in api and "inferstack_queue_depth" not in worker
    assert value(worker, "inferstack_models_loaded") >= 1


def test_several_api_processes_share_one_scrape(redis_url, tiny_registry, tmp_path):
    """Two uvicorn worker processes; every request is refused (low tier, no room), so
    each process counts what it served, and any one scrape shows the sum."""
    port = free_port()
    env = {**os.environ, "INFERSTACK_REDIS_URL": redis_url, "INFERSTACK_PORT": str(port),
           "INFERSTACK_MODELS_FILE": str(tiny_registry), "INFERSTACK_CACHE_DIR": str(tmp_path / "cache"),
           "INFERSTACK_API_WORKERS": "2", "INFERSTACK_TIER_SHARE_LOW": "0", "INFERSTACK_LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    proc = subprocess.Popen([sys.executable, "-m", "inferstack.cli", "api"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, "the API processes")
        for _ in range(8):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "priority": "low"})
            assert r.status_code == 429
        pids = {name.rsplit("_", 1)[-1] for name in os.listdir(tmp_path / "prom") if name.startswith("counter_")}
        for _ in range(3):  # whichever process answers the scrape
            families = scrape(f"{url}/metrics")
            assert value(families, "inferstack_requests_total", model="tiny", tier="low", status="rejected") == 8
            assert "inferstack_queue_depth" not in families  # the exporter's alone
    finally:
        proc.terminate()
        proc.wait(30)
    assert pids  # the processes wrote their counters to the shared directory


def test_queue_depth_comes_from_the_exporter_alone(redis_url, rclient, tiny_registry, tmp_path):
    """Requests wait (no worker); two API processes serve /metrics without the depth,
    the exporter process serves it once per model and tier, read from Redis when
    scraped — so a sum over API replicas cannot count the queue twice."""
    metrics_port = free_port()
    env = {**os.environ, "INFERSTACK_REDIS_URL": redis_url, "INFERSTACK_MODELS_FILE": str(tiny_registry),
           "INFERSTACK_CACHE_DIR": str(tmp_path / "cache"), "INFERSTACK_CHDB_PATH": str(tmp_path / "chdb"),
           "INFERSTACK_METRICS_PORT": str(metrics_port), "INFERSTACK_METRICS_HOST": "127.0.0.1",
           "INFERSTACK_LOG_LEVEL": "WARNING"}
    exporter = subprocess.Popen([sys.executable, "-m", "inferstack.cli", "exporter"], env=env)
    api = Stack(redis_url, tiny_registry, tmp_path / "cache", workers=0)
    fq = FairQueue(rclient, SchedulerSettings())
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_http(url, exporter, "the exporter")
        before = scrape(url)
        assert {(s.labels["model"], s.labels["tier"]): s.value for s in before["inferstack_queue_depth"].samples} \
            == {("tiny", "high"): 0, ("tiny", "normal"): 0, ("tiny", "low"): 0}
        for i, tier in enumerate(["normal", "normal", "normal", "high", "high"]):
            admitted = fq.enqueue(GenerateRequest(id=f"q{i}", model="tiny", prompt_token_ids=[1, 2, 3],
                                                  params=SamplingParams(max_tokens=4), reply_to="is:reply:t",
                                                  user=f"u{i}", tier=Tier(tier)))
            assert admitted.admitted
        families = scrape(url)
        assert value(families, "inferstack_queue_depth", model="tiny", tier="normal") == 3
        assert value(families, "inferstack_queue_depth", model="tiny", tier="high") == 2
        assert value(families, "inferstack_queue_depth", model="tiny", tier="low") == 0
        fq.claim_batch("tiny", "w1", 2)  # the high tier goes first; read again at the next scrape
        families = scrape(url)
        assert value(families, "inferstack_queue_depth", model="tiny", tier="high") == 0
        assert value(families, "inferstack_queue_depth", model="tiny", tier="normal") == 3
        assert "inferstack_queue_depth" not in scrape(f"{api.url}/metrics")
    finally:
        api.stop()
        exporter.terminate()
        exporter.wait(30)
    assert exporter.returncode == 0
