"""Demand-driven loading through the real API and worker: a request for a registered
model that no worker has loaded is queued, and the worker best placed loads it."""

from __future__ import annotations

import json

import httpx
import pytest

from broker import keys
from scheduler.queue import depths
from tests.stack import Stack


@pytest.fixture
def stack(redis_url, tmp_path, tiny_model_dir):
    models = tmp_path / "models.toml"
    models.write_text("".join(
        f'[models."{name}"]\nmodality = "text"\npath = "{tiny_model_dir}"\nmax_batch = 4\nmemory_gb = {gb}\n'
        for name, gb in (("tiny", 0.01), ("tiny-b", 0.01), ("tiny-huge", 100000))
    ))
    s = Stack(redis_url, models, tmp_path / "cache", worker_kw={"worker_models": "tiny"})
    yield s
    s.stop()


def chat(stack, model):
    return httpx.post(f"{stack.url}/v1/chat/completions", timeout=60, json={
        "model": model, "max_tokens": 4, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Hello"}]})


def test_request_for_an_unloaded_model_is_queued_and_loads_it(stack, rclient):
    info = rclient.hgetall(keys.worker(stack.workers[0].worker.id))
    assert json.loads(info["models"]) == ["tiny"]
    assert "tiny-b" in json.loads(info["can_load"]) and "tiny-huge" not in json.loads(info["can_load"])

    r = chat(stack, "tiny-b")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    manager = stack.workers[0].worker.models
    assert sorted(manager) == ["tiny", "tiny-b"] and manager.loads == 1


def test_a_model_no_worker_could_ever_hold_is_refused_clearly(stack, rclient):
    r = chat(stack, "tiny-huge")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "no_capable_worker" and "100000" in err["message"]
    assert sum(depths(rclient, ["tiny-huge"])["tiny-huge"].values()) == 0
