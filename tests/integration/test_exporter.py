"""The exporter on a real redis-server and real chDB: one row per request, at least
once, and nothing counted twice when it dies at the worst moments."""

import os
import signal
import subprocess
import sys
import time

import pytest

from broker import keys
from metrics.events import Kind, add_to_pipeline, event
from metrics.exporter import Exporter
from metrics.settings import ExporterSettings
from metrics.store import ChdbStore


def request_events(i: int, t0: float = 1_800_000_000.0) -> list:
    rid, t = f"req-{i:04d}", t0 + i
    return [
        event(Kind.ENQUEUED, rid, t, model="m", user=f"u{i % 3}", tier="normal", prompt_tokens=10 + i, max_tokens=64),
        event(Kind.CLAIMED, rid, t + 0.1, model="m", worker="w1", attempt=1, batch_size=1 + i % 4),
        event(Kind.FIRST_TOKEN, rid, t + 0.2, model="m"),
        event(Kind.RELEASED, rid, t + 0.9, model="m", worker="w1", completion_tokens=i % 7 + 1),
        event(Kind.FINISHED, rid, t + 1.0, model="m", completion_tokens=i % 7 + 1),
    ]


def emit(client, events) -> None:
    pipe = client.pipeline(transaction=False)
    for ev in events:
        add_to_pipeline(pipe, ev, maxlen=1_000_000)
    pipe.execute()


def expected_tokens(n: int) -> int:
    return sum(i % 7 + 1 for i in range(n))


def settings(redis_url, path, **kw) -> ExporterSettings:
    return ExporterSettings(**{"redis_url": redis_url, "chdb_path": path, "exporter_id": "exporter-test",
                               "exporter_batch": 25, "exporter_flush_s": 0.2, **kw})


def totals(store) -> dict:
    return store.query("SELECT count() AS requests, sum(completion_tokens) AS tokens, countIf(status = 'finished') AS "
                       "finished, uniqExact(request_id) AS ids FROM requests")[0]


class CrashAfterInsert(ChdbStore):
    """The store writes the batch, then the process 'dies' before the exporter acks."""

    def insert(self, rows):
        super().insert(rows)
        raise SystemExit("killed between insert and ack")


class CrashBeforeInsert(ChdbStore):
    def insert(self, rows):
        raise SystemExit("killed after reading, before writing")


def test_exports_one_row_per_request_and_acks_and_trims(rclient, redis_url, tmp_path):
    for i in range(60):
        emit(rclient, request_events(i))
    store = ChdbStore(tmp_path / "chdb")
    exporter = Exporter(rclient, store, settings(redis_url, tmp_path / "chdb"))
    exporter.run(burst=True)
    assert totals(store) == {"requests": 60, "tokens": expected_tokens(60), "finished": 60, "ids": 60}
    row = store.query("SELECT * FROM requests WHERE request_id = 'req-0005'")[0]
    assert (row["user"], row["worker"], row["prompt_tokens"], row["batch_size"]) == ("u2", "w1", 15, 2)
    assert row["queue_wait_s"] == pytest.approx(0.1) and row["ttft_s"] == pytest.approx(0.2)
    assert rclient.xpending(keys.EVENTS, keys.EVENTS_GROUP)["pending"] == 0
    assert rclient.xlen(keys.EVENTS) < 300  # acknowledged entries are trimmed


def test_killed_between_insert_and_ack_replays_without_double_counting(rclient, redis_url, tmp_path):
    for i in range(40):
        emit(rclient, request_events(i))
    path = tmp_path / "chdb"
    doomed = Exporter(rclient, CrashAfterInsert(path), settings(redis_url, path))
    doomed.ensure_group()
    with pytest.raises(SystemExit):
        doomed.step(block=False)  # wrote one batch, never acked it
    assert rclient.xpending(keys.EVENTS, keys.EVENTS_GROUP)["pending"] == 25

    store = ChdbStore(path)
    Exporter(rclient, store, settings(redis_url, path)).run(burst=True)  # the restart: same consumer name
    assert totals(store) == {"requests": 40, "tokens": expected_tokens(40), "finished": 40, "ids": 40}
    raw = store.query("SELECT count() AS n FROM requests_raw")[0]["n"]
    assert raw > 8  # the first batch's requests really were written twice; the view still counts them once
    assert rclient.xpending(keys.EVENTS, keys.EVENTS_GROUP)["pending"] == 0


def test_another_exporter_takes_over_what_a_dead_one_left_pending(rclient, redis_url, tmp_path):
    for i in range(30):
        emit(rclient, request_events(i))
    path = tmp_path / "chdb"
    doomed = Exporter(rclient, CrashBeforeInsert(path), settings(redis_url, path))
    doomed.ensure_group()
    with pytest.raises(SystemExit):
        doomed.step(block=False)
    store = ChdbStore(path)
    other = Exporter(rclient, store, settings(redis_url, path, exporter_id="exporter-other",
                                              exporter_claim_idle_s=0.05))
    time.sleep(0.1)  # let the dead exporter's entries become idle
    other.run(burst=True)
    assert totals(store) == {"requests": 30, "tokens": expected_tokens(30), "finished": 30, "ids": 30}
    assert rclient.xpending(keys.EVENTS, keys.EVENTS_GROUP)["pending"] == 0


def test_kill_9_mid_stream_then_restart_loses_and_doubles_nothing(rclient, redis_url, tmp_path):
    path = tmp_path / "chdb"
    env = {**os.environ, "INFERSTACK_REDIS_URL": redis_url, "INFERSTACK_CHDB_PATH": str(path),
           "INFERSTACK_EXPORTER_ID": "exporter-kill", "INFERSTACK_EXPORTER_BATCH": "20",
           "INFERSTACK_EXPORTER_FLUSH_S": "0.1", "INFERSTACK_LOG_LEVEL": "WARNING"}

    def start():
        return subprocess.Popen([sys.executable, "-m", "metrics.exporter"], env=env)

    def group() -> dict:
        groups = rclient.xinfo_groups(keys.EVENTS) if rclient.exists(keys.EVENTS) else []
        return groups[0] if groups else {"entries-read": 0, "lag": None, "pending": None}

    n = 200
    proc = start()
    try:
        emit(rclient, [ev for i in range(80) for ev in request_events(i)])
        deadline = time.monotonic() + 120
        while (group()["entries-read"] or 0) < 150:  # well into the stream: kill it, whatever it is doing
            assert proc.poll() is None and time.monotonic() < deadline, "the exporter never got going"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert group()["lag"] > 0  # it died with events still unread (and usually a batch unacknowledged)
        emit(rclient, [ev for i in range(80, n) for ev in request_events(i)])  # the stream goes on
        proc = start()
        deadline = time.monotonic() + 120
        while not (group()["lag"] == 0 and group()["pending"] == 0):
            assert time.monotonic() < deadline, f"the restarted exporter did not catch up: {group()}"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    store = ChdbStore(path)
    assert totals(store) == {"requests": n, "tokens": expected_tokens(n), "finished": n, "ids": n}


def test_redis_back_without_the_stream_gets_the_group_made_again(rclient, redis_url, tmp_path):
    """Redis restarted without persistence (or flushed) under a running exporter: it
    creates its consumer group again instead of failing on NOGROUP forever."""
    import threading

    for i in range(5):
        emit(rclient, request_events(i))
    store = ChdbStore(tmp_path / "chdb")
    exporter = Exporter(rclient, store, settings(redis_url, tmp_path / "chdb"))
    stop = threading.Event()
    runner = threading.Thread(target=exporter.run, args=(stop,))
    runner.start()

    def until(n):
        deadline = time.monotonic() + 30
        while exporter.rows_written < n:
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.05)

    try:
        until(5)
        rclient.flushall()  # the stream and its group are gone
        for i in range(5, 9):
            emit(rclient, request_events(i))
        until(9)
    finally:
        stop.set()
        runner.join(10)
    assert totals(store)["requests"] == 9
