"""The admin routes for workers and hosts, against a real redis-server: a host
supervisor's status (published by a real ``HostSupervisor`` that runs no workers
here), mode changes queued on its command list, validation, and admin-only access."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from api.settings import ApiSettings
from broker import keys, messages
from broker.messages import HostMode, encode_heartbeat
from inferstack.host import HostSettings, HostSupervisor
from inferstack.redis_server import free_port
from scheduler.settings import SchedulerSettings
from tests.stack import ApiThread

ADMIN = "sk-admin-test"


@pytest.fixture
def models(tmp_path, tiny_model_dir):
    path = tmp_path / "models.toml"
    path.write_text(f"""
[models.tiny]
modality = "text"
path = "{tiny_model_dir}"

[models.wide]
modality = "text"
path = "{tiny_model_dir}"
tensor_parallel = 2
""")
    return path


@pytest.fixture
def api(redis_url, models, tmp_path):
    started = []

    def start(**kw) -> str:
        a = ApiThread(ApiSettings(redis_url=redis_url, models_file=models, cache_dir=tmp_path / "cache",
                                  port=free_port(), **kw), SchedulerSettings(redis_url=redis_url))
        started.append(a)
        return a.url

    yield start
    for a in started:
        a.stop()


@pytest.fixture
def host(redis_url, models):
    """A supervisor's status in Redis, as ``inferstack host`` on a two-GPU host publishes it."""
    supervisor = HostSupervisor(HostSettings(redis_url=redis_url, models_file=models, host_id="gpu-host-1",
                                             host_devices="cuda:0,cuda:1"), env={})
    supervisor.publish()
    return supervisor


def commands(redis_url: str) -> list:
    client = redis.Redis.from_url(redis_url)
    try:
        return [messages.decode(raw) for raw in client.lrange(keys.host_commands("gpu-host-1"), 0, -1)]
    finally:
        client.close()


def test_hosts_listed_and_a_mode_change_queued(api, host, redis_url):
    url = api()
    hosts = httpx.get(f"{url}/v1/admin/hosts").json()["data"]
    assert [(h["host_id"], h["devices"], h["mode"]) for h in hosts] == [("gpu-host-1", ["cuda:0", "cuda:1"],
                                                                          "individual")]
    r = httpx.post(f"{url}/v1/admin/hosts/gpu-host-1/mode", json={"mode": "tp", "model": "wide"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["mode"], body["model"], body["size"], body["status"]) == ("tp", "wide", 2, "queued")
    r = httpx.post(f"{url}/v1/admin/hosts/gpu-host-1/mode", json={"mode": "individual"})
    assert r.status_code == 202
    queued = commands(redis_url)
    assert [(c.id, c.mode, c.model, c.size) for c in queued] == [
        (body["id"], HostMode.TP, "wide", 2), (r.json()["id"], HostMode.INDIVIDUAL, None, None)]
    # the supervisor takes them in order
    assert host._next_command().id == body["id"]


@pytest.mark.parametrize("body, param", [
    ({"mode": "tp"}, "model"),
    ({"mode": "tp", "model": "nope"}, "model"),
    ({"mode": "tp", "model": "tiny", "size": 3}, "size"),
    ({"mode": "individual", "size": 2}, "size"),
    ({"mode": "sideways"}, "mode"),
    ({"mode": "tp", "model": "tiny", "size": 1}, "size"),
    ({"mode": "tp", "model": "tiny", "colour": "red"}, "colour"),
])
def test_invalid_mode_changes_are_400_and_queue_nothing(api, host, redis_url, body, param):
    r = httpx.post(f"{api()}/v1/admin/hosts/gpu-host-1/mode", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or ""), error
    assert commands(redis_url) == []


def test_unknown_host_is_404(api, host):
    r = httpx.post(f"{api()}/v1/admin/hosts/elsewhere/mode", json={"mode": "individual"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "host_not_found"
    assert httpx.get(f"{api()}/v1/admin/hosts/elsewhere").status_code == 404


def test_admin_key_required_in_keyed_mode(api, host, tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('[keys."sk-user"]\nuser = "acme"\n\n[keys."sk-ops"]\nuser = "ops"\nadmin = true\n')
    url = api(keys_file=keys_file, admin_key=ADMIN)
    change = {"mode": "tp", "model": "tiny"}
    assert httpx.post(f"{url}/v1/admin/hosts/gpu-host-1/mode", json=change).status_code == 401
    for path in ("/v1/admin/workers", "/v1/admin/hosts", "/v1/admin/hosts/gpu-host-1"):
        r = httpx.get(f"{url}{path}", headers={"Authorization": "Bearer sk-user"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = httpx.post(f"{url}/v1/admin/hosts/gpu-host-1/mode", json=change, headers={"Authorization": "Bearer sk-user"})
    assert r.status_code == 403
    for key in (ADMIN, "sk-ops"):
        r = httpx.post(f"{url}/v1/admin/hosts/gpu-host-1/mode", json=change, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 202, r.text


def test_a_model_needing_a_group_is_refused_with_the_way_to_serve_it(api, host, rclient):
    """An individual worker never loads a tensor_parallel=2 model; until a host runs a
    group for it, requests get 503 saying how to switch one."""
    url = api()
    beat = {"id": "w1", "models": ["tiny"], "can_load": ["tiny"], "registry": ["tiny", "wide"], "states": {},
            "model_capacity_bytes": 1 << 34, "state": "ready"}
    rclient.hset(keys.worker("w1"), mapping=encode_heartbeat(beat))
    rclient.zadd(keys.WORKERS, {"w1": time.time()})
    chat = {"model": "wide", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{url}/v1/chat/completions", json=chat)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "no_capable_worker" and "gpu-host-1" in error["message"]
    assert "/v1/admin/hosts/{host}/mode" in error["message"]
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny"]
