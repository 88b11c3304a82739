"""The stats SQL for real, on chDB, against known requests; percentiles checked
against values computed by hand (linear interpolation between ranks).

Every test runs on both stores: ``ChdbStore`` (chDB sessions, what ``make run`` uses)
and ``ClickHouseStore`` — the clickhouse-connect code that talks to a ClickHouse
server — here pointed at clickhouse-connect's embedded chDB backend (``chdb://``
DSN), so its inserts, parameter binding and result decoding run for real."""

import pytest

from metrics import stats
from metrics.events import Kind, event
from metrics.exporter import assemble
from metrics.store import ChdbStore, ClickHouseStore

T0 = 1_800_000_000.0
UNTIL = T0 + 1000


def known_events():
    """m1: alice finishes 10 requests (TTFT 0.1..1.0 s, latency 1..10 s, queue wait half
    the TTFT, 100-token prompts, 21 output tokens, 25 prompt tokens from a reused KV
    cache in half of them); bob has one that failed before starting and one he
    cancelled while queued; carol's was rejected. m2: one request. One more request
    ended before the window and one after it."""
    evs = []
    for i in range(10):
        t, ttft, latency = T0 + 10 * i, (i + 1) / 10, float(i + 1)
        rid = f"a{i}"
        evs += [
            event(Kind.ENQUEUED, rid, t, model="m1", user="alice", tier="normal", prompt_tokens=100, max_tokens=32),
            event(Kind.CLAIMED, rid, t + ttft / 2, model="m1", worker="w1", attempt=1, batch_size=i + 1),
            event(Kind.FIRST_TOKEN, rid, t + ttft, model="m1"),
            event(Kind.RELEASED, rid, t + latency - 0.01, model="m1", worker="w1", completion_tokens=21,
                  cached_tokens=25 if i % 2 else 0),
            event(Kind.FINISHED, rid, t + latency, model="m1", completion_tokens=21, cached_tokens=25 if i % 2 else 0),
        ]
    evs += [
        event(Kind.ENQUEUED, "b0", T0 + 5, model="m1", user="bob", tier="normal", prompt_tokens=50),
        event(Kind.FAILED, "b0", T0 + 35, model="m1", error="deadline_exceeded"),
        event(Kind.ENQUEUED, "b1", T0 + 6, model="m1", user="bob", tier="normal", prompt_tokens=50),
        event(Kind.CANCELLED, "b1", T0 + 7, model="m1", error="client_closed"),
        event(Kind.REJECTED, "c0", T0 + 8, model="m1", user="carol", tier="low", prompt_tokens=70, error="queue_full"),
        event(Kind.ENQUEUED, "d0", T0 + 1, model="m2", user="alice", tier="high", prompt_tokens=10),
        event(Kind.CLAIMED, "d0", T0 + 1.5, model="m2", worker="w2", attempt=1, batch_size=1),
        event(Kind.FIRST_TOKEN, "d0", T0 + 2, model="m2"),
        event(Kind.FINISHED, "d0", T0 + 4, model="m2", completion_tokens=9),
        event(Kind.ENQUEUED, "old", UNTIL - 3700, model="m1", user="alice", tier="normal", prompt_tokens=5),
        event(Kind.FINISHED, "old", UNTIL - 3601, model="m1", completion_tokens=1),
        event(Kind.ENQUEUED, "late", UNTIL - 1, model="m1", user="alice", tier="normal", prompt_tokens=5),
        event(Kind.FINISHED, "late", UNTIL + 1, model="m1", completion_tokens=1),
    ]
    return evs


@pytest.fixture(params=["chdb-session", "clickhouse-connect"])
def store(request, tmp_path):
    path = tmp_path / "chdb"
    s = ChdbStore(path) if request.param == "chdb-session" else ClickHouseStore(f"chdb://{path}")
    evs = known_events()
    # Split each request over two batches, as the exporter may.
    s.insert(assemble([e for e in evs if e.kind in (Kind.ENQUEUED, Kind.REJECTED)]))
    s.insert(assemble([e for e in evs if e.kind not in (Kind.ENQUEUED, Kind.REJECTED)]))
    yield s
    s.close()


def test_one_row_per_request_in_the_view(store):
    rows = {r["request_id"]: r for r in store.query("SELECT * FROM requests")}
    assert len(rows) == 16
    a3 = rows["a3"]
    assert (a3["status"], a3["worker"], a3["prompt_tokens"], a3["completion_tokens"]) == ("finished", "w1", 100, 21)
    assert a3["queue_wait_s"] == pytest.approx(0.2) and a3["ttft_s"] == pytest.approx(0.4)
    assert a3["latency_s"] == pytest.approx(4.0) and a3["tokens_per_s"] == pytest.approx(20 / 3.6)
    assert a3["batch_size"] == 4 and a3["kv_reused_tokens"] == 25 and a3["error_type"] == ""
    b0 = rows["b0"]
    assert (b0["status"], b0["error_type"], b0["latency_s"]) == ("failed", "deadline_exceeded", 30)
    assert rows["b1"]["status"] == "cancelled" and rows["b1"]["queue_wait_s"] is None
    assert (rows["c0"]["status"], rows["c0"]["tier"], rows["c0"]["latency_s"]) == ("rejected", "low", 0)


def test_per_model_stats_match_hand_computed_values(store):
    report = stats.stats(store, 3600, until=UNTIL)
    m1, m2 = report["models"]
    assert (m1["model"], m1["requests"], m1["finished"], m1["errors"], m1["rejected"], m1["cancelled"]) == \
        ("m1", 13, 10, 1, 1, 1)
    # TTFT 0.1 .. 1.0: rank 0.5*9 = 4.5 -> 0.55; 0.95*9 = 8.55 -> 0.955; 0.99*9 = 8.91 -> 0.991
    assert m1["ttft_s"] == pytest.approx({"p50": 0.55, "p95": 0.955, "p99": 0.991})
    # latency of the 10 finished: 1 .. 10 s
    assert m1["latency_s"] == pytest.approx({"p50": 5.5, "p95": 9.55, "p99": 9.91})
    assert m1["queue_wait_s"] == pytest.approx({"p50": 0.275, "p95": 0.4775, "p99": 0.4955})
    assert m1["queue_wait_mean_s"] == pytest.approx(0.275)
    # per-request decode speed 20 tokens / (0.9 * latency): median of the 5th and 6th slowest
    assert m1["request_tokens_per_s_p50"] == pytest.approx((20 / 5.4 + 20 / 4.5) / 2)
    # 210 tokens between the first enqueue (T0) and the last end (T0 + 100)
    assert m1["completion_tokens"] == 210 and m1["output_tokens_per_s"] == pytest.approx(2.1)
    # 5 x 25 reused of 10 x 100 + 2 x 50 prompt tokens (the rejected one never ran)
    assert m1["kv_hit_rate"] == pytest.approx(125 / 1100)
    assert (m2["model"], m2["requests"], m2["ttft_s"]["p99"], m2["latency_s"]["p50"]) == ("m2", 1, 1.0, 3.0)


def test_per_tenant_breakdown(store):
    tenants = {(t["model"], t["user"], t["tier"]): t for t in stats.stats(store, 3600, until=UNTIL)["tenants"]}
    assert set(tenants) == {("m1", "alice", "normal"), ("m1", "bob", "normal"), ("m1", "carol", "low"),
                            ("m2", "alice", "high")}
    alice = tenants[("m1", "alice", "normal")]
    assert (alice["requests"], alice["errors"], alice["completion_tokens"]) == (10, 0, 210)
    assert alice["ttft_s"]["p50"] == pytest.approx(0.55) and alice["kv_hit_rate"] == pytest.approx(0.125)
    bob = tenants[("m1", "bob", "normal")]
    assert (bob["requests"], bob["errors"], bob["cancelled"], bob["ttft_s"]["p50"]) == (2, 1, 1, None)
    assert tenants[("m1", "carol", "low")]["rejected"] == 1


def test_model_filter_and_an_empty_window(store):
    assert [m["model"] for m in stats.stats(store, 3600, until=UNTIL, model="m2")["models"]] == ["m2"]
    empty = stats.stats(store, 60, until=T0 - 7200)
    assert empty["models"] == [] and empty["tenants"] == []
    assert "no requests in this window" in stats.render(empty)


def test_replayed_rows_change_nothing(store):
    before = stats.stats(store, 3600, until=UNTIL)
    store.insert(assemble(known_events()))  # every event again, as after a crash between insert and ack
    store.command("OPTIMIZE TABLE requests_raw FINAL")
    assert stats.stats(store, 3600, until=UNTIL) == before
    assert store.query("SELECT count() AS n FROM requests_raw") == [{"n": 16}]


def test_render_prints_tables(store):
    text = stats.render(stats.stats(store, 3600, until=UNTIL))
    assert "m1" in text and "alice" in text and "550/955/991" in text


def test_a_store_created_before_the_preemption_columns_gains_them(tmp_path):
    """Opening a chDB directory written by an older release adds the new columns
    (schema.sql's ALTERs), and a preempted request reads back with its count and wait."""
    from chdb.session import Session

    from metrics.store import schema_statements

    path = tmp_path / "chdb"
    old = Session(str(path))
    old.query("CREATE DATABASE IF NOT EXISTS inferstack")
    old.query("USE inferstack")
    create = schema_statements()[0]
    lines = [ln for ln in create.splitlines() if not ln.strip().startswith(("preemptions", "preempted_ms"))]
    old.query("\n".join(lines))
    old.close()
    store = ChdbStore(path)
    rid = "p0"
    store.insert(assemble([
        event(Kind.ENQUEUED, rid, T0, model="m1", user="u", tier="low"),
        event(Kind.CLAIMED, rid, T0 + 1, model="m1", worker="w1", attempt=1),
        event(Kind.PREEMPTED, rid, T0 + 2, model="m1", worker="w1", preemptions=1, reason="tier"),
        event(Kind.CLAIMED, rid, T0 + 5, model="m1", worker="w2", attempt=1, preemptions=1, preempted_ms=3000),
        event(Kind.FINISHED, rid, T0 + 9, model="m1"),
    ]))
    [row] = store.query("SELECT status, attempts, preemptions, preempted_s FROM requests")
    assert row == {"status": "finished", "attempts": 1, "preemptions": 1, "preempted_s": 3.0}


def test_chdb_store_cleans_up_the_parts_merges_replaced(tmp_path, monkeypatch):
    """Each insert is a short session that leaves a part directory; without a cleanup
    they pile up and every later open reads them all. Now and then the writer holds its
    session long enough for ClickHouse to merge and delete the replaced ones."""
    from metrics import store as store_mod

    s = store_mod.ChdbStore(tmp_path / "chdb")
    row = {"request_id": "", "model": "m", "user": "u", "updated_at": 1.0}
    for i in range(12):
        s.insert([{**row, "request_id": f"r{i}"}])
    piled = s.part_directories()
    assert piled >= 10, piled  # short sessions: nothing cleaned up yet
    monkeypatch.setattr(store_mod, "TIDY_EVERY_S", 0.0)
    s.insert([{**row, "request_id": "r12"}])
    after = s.part_directories()
    assert after <= piled // 2, (piled, after)
    assert s.query("SELECT count() AS n FROM requests")[0]["n"] == 13  # nothing lost on the way
