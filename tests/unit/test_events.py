"""Lifecycle events on the wire, and how the exporter folds them into rows."""

import re
from importlib import resources

import pytest

from metrics.events import Kind, LifecycleEvent, event
from metrics.exporter import MERGE, assemble


def test_fields_round_trip_and_leave_defaults_out():
    ev = event(Kind.CLAIMED, "r1", 1700000000.25, model="m", worker="w1", attempt=2, batch_size=5)
    fields = ev.fields()
    assert fields == {"kind": "claimed", "request_id": "r1", "ts": "1700000000.25", "model": "m", "worker": "w1",
                      "attempt": "2", "batch_size": "5"}
    assert LifecycleEvent.from_fields(fields) == ev


def test_unknown_fields_from_a_newer_emitter_are_ignored():
    ev = LifecycleEvent.from_fields({"kind": "first_token", "request_id": "r", "ts": "1.5", "gpu_temp": "80"})
    assert ev == LifecycleEvent(Kind.FIRST_TOKEN, "r", 1.5)


def lifecycle(rid: str, t0: float) -> list[LifecycleEvent]:
    return [
        event(Kind.ENQUEUED, rid, t0, model="m", user="alice", tier="normal", prompt_tokens=10, max_tokens=32),
        event(Kind.CLAIMED, rid, t0 + 0.5, model="m", user="alice", tier="normal", worker="w1", attempt=1,
              batch_size=3, prompt_tokens=10),
        event(Kind.FIRST_TOKEN, rid, t0 + 0.75, model="m"),
        event(Kind.RELEASED, rid, t0 + 1.9, model="m", worker="w1", completion_tokens=20, cached_tokens=4),
        event(Kind.FINISHED, rid, t0 + 2.0, model="m", completion_tokens=20, cached_tokens=4),
    ]


def test_one_row_per_request_with_every_step():
    rows = assemble(lifecycle("a", 100.0) + lifecycle("b", 200.0))
    assert [r["request_id"] for r in rows] == ["a", "b"]
    a = rows[0]
    assert (a["model"], a["user"], a["tier"], a["claimed_by"], a["released_by"]) == ("m", "alice", "normal", "w1", "w1")
    assert (a["enqueued_at"], a["claimed_at"], a["first_token_at"], a["finished_at"]) == (100.0, 100.5, 100.75, 102.0)
    assert (a["prompt_tokens"], a["completion_tokens"], a["kv_reused_tokens"], a["batch_size"]) == (10, 20, 4, 3)
    assert a["failed_at"] is None and a["error_type"] == "" and a["updated_at"] == 102.0


def test_replayed_and_reordered_events_give_the_same_row():
    events = lifecycle("a", 100.0)
    assert assemble(events + events) == assemble(events) == assemble(list(reversed(events)))


def test_a_resumed_request_keeps_its_first_claim_and_the_finishing_worker():
    events = lifecycle("a", 100.0)
    events.insert(3, event(Kind.CLAIMED, "a", 101.0, model="m", worker="w2", attempt=2, batch_size=1))
    row = assemble(events)[0]
    assert row["claimed_at"] == 100.5 and row["attempts"] == 2 and row["batch_size"] == 3


def test_every_raw_column_merges_like_the_schema_says():
    ddl = (resources.files("metrics") / "schema.sql").read_text()
    table = ddl[ddl.index("CREATE TABLE"):ddl.index("ENGINE")]
    declared = dict(re.findall(r"^\s+(\w+)\s+SimpleAggregateFunction\((\w+),", table, re.M))
    assert declared == MERGE


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_assembles(kind):
    row = assemble([event(kind, "r", 5.0, model="m")])[0]
    assert row["request_id"] == "r" and row["updated_at"] == 5.0
