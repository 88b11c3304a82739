"""Lifecycle events from the real API and a real worker (tiny model, real Redis),
through the exporter into chDB, read back by /v1/stats and `inferstack stats`."""

import json
import time

import httpx
import pytest

from metrics.exporter import Exporter
from metrics.settings import ExporterSettings
from metrics.store import ChdbStore
from scheduler.queue import depths
from scheduler.settings import SchedulerSettings
from tests.stack import Stack

ADMIN = {"Authorization": "Bearer admin-s3cret"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}], "ignore_eos": True}


@pytest.fixture
def chdb_path(tmp_path):
    return tmp_path / "chdb"


@pytest.fixture
def stack(redis_url, tiny_registry, tmp_path, chdb_path):
    # Low-priority requests find no room (tier share 0): a deterministic 429.
    sched = SchedulerSettings(redis_url=redis_url, lease_s=3, tier_share_low=0.0)
    s = Stack(redis_url, tiny_registry, tmp_path / "cache", sched=sched,
              api_kw={"chdb_path": chdb_path, "admin_key": "admin-s3cret"})
    yield s
    s.stop()


@pytest.fixture
def export(rclient, redis_url, chdb_path):
    store = ChdbStore(chdb_path)
    exporter = Exporter(rclient, store, ExporterSettings(redis_url=redis_url, chdb_path=chdb_path,
                                                         exporter_flush_s=0.05))

    def until(done, timeout_s: float = 30.0) -> dict[str, dict]:
        """Export what the API and worker have emitted until ``done(rows)`` holds
        (their events are written a moment after the HTTP response)."""
        deadline = time.monotonic() + timeout_s
        while True:
            exporter.run(burst=True)
            rows = {r["request_id"]: r for r in store.query("SELECT * FROM requests")}
            if done(rows):
                return rows
            assert time.monotonic() < deadline, f"rows never got there: {rows}"
            time.sleep(0.1)

    return until


def test_finished_rejected_and_cancelled_requests_become_rows(stack, export, rclient):
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", timeout=30, json={
            **CHAT, "max_tokens": 12, "user": "alice", "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    finished_id, usage = chunks[0]["id"], chunks[-1]["usage"]

    rejected = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30,
                          json={**CHAT, "max_tokens": 4, "user": "bob", "priority": "low"})
    assert rejected.status_code == 429

    worker = stack.workers[0].worker
    worker.claimer.paused.set()  # it stays queued until the client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.url}/v1/chat/completions", timeout=1.0, json={**CHAT, "max_tokens": 4, "user": "carol"})
    deadline = time.monotonic() + 10
    while depths(rclient, ["tiny"])["tiny"]["normal"]:  # the API dequeues it
        assert time.monotonic() < deadline, "the abandoned request was never dequeued"
        time.sleep(0.05)
    worker.claimer.paused.clear()

    rows = export(lambda rows: len(rows) == 3 and all(r["status"] != "running" for r in rows.values()))
    done = rows[finished_id]
    assert (done["status"], done["user"], done["tier"], done["worker"]) == ("finished", "alice", "normal", worker.id)
    assert done["prompt_tokens"] == usage["prompt_tokens"] and done["completion_tokens"] == usage["completion_tokens"]
    assert done["max_tokens"] == 12 and done["attempts"] == 1 and done["batch_size"] >= 1
    assert 0 <= done["queue_wait_s"] <= done["ttft_s"] <= done["latency_s"]
    assert done["tokens_per_s"] > 0 and done["error_type"] == ""
    by_user = {r["user"]: r for r in rows.values()}
    assert (by_user["bob"]["status"], by_user["bob"]["tier"], by_user["bob"]["error_type"]) == \
        ("rejected", "low", "queue_full")
    assert by_user["carol"]["status"] == "cancelled" and by_user["carol"]["queue_wait_s"] is None


def test_stats_endpoint_and_cli_agree(stack, export, chdb_path, monkeypatch, capsys):
    for user in ("alice", "alice", "bob"):
        r = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30, json={**CHAT, "max_tokens": 5, "user": user})
        assert r.status_code == 200
    export(lambda rows: sum(r["status"] == "finished" for r in rows.values()) == 3)

    r = httpx.get(f"{stack.url}/v1/stats", params={"window": "15m"}, headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    report = r.json()
    (model,) = report["models"]
    assert (model["model"], model["requests"], model["finished"], model["errors"]) == ("tiny", 3, 3, 0)
    assert model["completion_tokens"] == 15 and model["ttft_s"]["p50"] > 0 and model["output_tokens_per_s"] > 0
    assert {(t["user"], t["requests"]) for t in report["tenants"]} == {("alice", 2), ("bob", 1)}

    monkeypatch.setenv("INFERSTACK_CHDB_PATH", str(chdb_path))
    with pytest.raises(SystemExit) as exit_code:
        from inferstack.cli import main

        main(["stats", "--window", "15m", "--json"])
    assert exit_code.value.code == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["models"][0]["requests"] == 3 and cli["tenants"] == report["tenants"]


def test_stats_needs_the_admin_key_and_a_valid_window(stack):
    assert httpx.get(f"{stack.url}/v1/stats", timeout=30).status_code == 403
    wrong = httpx.get(f"{stack.url}/v1/stats", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "admin_required"
    bad = httpx.get(f"{stack.url}/v1/stats", params={"window": "soon"}, headers=ADMIN, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"
