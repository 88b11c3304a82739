"""The metrics exporter: lifecycle events (``is:events``) -> request rows in ClickHouse.

    inferstack exporter        # INFERSTACK_CLICKHOUSE_URL, or chDB in INFERSTACK_CHDB_PATH

With ``INFERSTACK_METRICS_PORT`` it also serves Prometheus metrics, among them the
queue depth per model and tier (read from Redis when scraped): the one place that
gauge comes from, so autoscalers count each waiting request once.

It reads the stream in a consumer group, assembles one row per request from that
request's events in the batch, inserts the batch, and only then acknowledges the
events. Delivery is at least once:

* killed before the insert: its events stay pending in the group; the restarted
  exporter (same consumer name) reads its own pending entries first, and another
  exporter takes over entries pending longer than ``exporter_claim_idle_s``;
* killed between insert and ack: the same events are written again, which changes
  nothing — every column merges with min/max (``schema.sql``), so a row written
  twice, or a request split over batches, reads back as exactly one request.

Acknowledged entries are trimmed from the stream (``XTRIM MINID``); the stream's
``MAXLEN ~`` cap bounds Redis memory when no exporter runs (older events are lost
then, and counted when found missing).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

import redis
from prometheus_client import REGISTRY

from broker import keys
from broker.connection import UNAVAILABLE, Outage, refresh_topology, sync_client
from inferstack.registry import Registry
from metrics import prom
from metrics.events import Kind, LifecycleEvent
from metrics.settings import ExporterSettings
from metrics.store import Store, open_store
from scheduler import queue

log = logging.getLogger(__name__)

# Every column of requests_raw and how it merges; the exporter merges a batch's
# events with the same functions ClickHouse uses to merge rows.
MERGE: dict[str, str] = {
    "model": "max", "user": "max", "tier": "max", "claimed_by": "max", "released_by": "max", "attempts": "max",
    "prompt_tokens": "max", "max_tokens": "max", "completion_tokens": "max", "kv_reused_tokens": "max",
    "batch_size": "max", "error_type": "max", "preemptions": "max", "preempted_ms": "max",
    "enqueued_at": "min", "claimed_at": "min", "first_token_at": "min",
    "finished_at": "max", "failed_at": "max", "cancelled_at": "max", "rejected_at": "max", "released_at": "max",
    "updated_at": "max",
}
_STRINGS = {"model", "user", "tier", "claimed_by", "released_by", "error_type"}
_EMPTY: dict[str, Any] = {c: None if c.endswith("_at") else "" if c in _STRINGS else 0 for c in MERGE}

_TERMINAL_AT = {Kind.FINISHED: "finished_at", Kind.FAILED: "failed_at", Kind.CANCELLED: "cancelled_at",
                Kind.REJECTED: "rejected_at", Kind.RELEASED: "released_at"}


def columns_of(ev: LifecycleEvent) -> dict[str, Any]:
    """The columns one event sets."""
    cols: dict[str, Any] = {"model": ev.model, "user": ev.user, "tier": ev.tier, "updated_at": ev.ts,
                            "prompt_tokens": ev.prompt_tokens, "error_type": ev.error}
    if ev.kind is Kind.ENQUEUED:
        cols.update(enqueued_at=ev.ts, max_tokens=ev.max_tokens)
    elif ev.kind is Kind.REJECTED:
        cols.update(enqueued_at=ev.ts, rejected_at=ev.ts)
    elif ev.kind is Kind.CLAIMED:
        cols.update(claimed_at=ev.ts, claimed_by=ev.worker, attempts=ev.attempt, batch_size=ev.batch_size,
                    preemptions=ev.preemptions, preempted_ms=ev.preempted_ms)
    elif ev.kind is Kind.PREEMPTED:
        cols["preemptions"] = ev.preemptions
    elif ev.kind is Kind.FIRST_TOKEN:
        cols.update(first_token_at=ev.ts)
    if ev.kind in _TERMINAL_AT:
        cols.update({_TERMINAL_AT[ev.kind]: ev.ts, "completion_tokens": ev.completion_tokens,
                     "kv_reused_tokens": ev.cached_tokens})
    if ev.kind is Kind.RELEASED:
        cols["released_by"] = ev.worker
    return cols


def _merge(fn: str, a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b) if fn == "max" else min(a, b)


def assemble(events: list[LifecycleEvent]) -> list[dict[str, Any]]:
    """One row per request id, merging its events in the batch."""
    rows: dict[str, dict[str, Any]] = {}
    for ev in events:
        row = rows.get(ev.request_id)
        if row is None:
            row = rows[ev.request_id] = {"request_id": ev.request_id, **_EMPTY}
        for col, value in columns_of(ev).items():
            row[col] = _merge(MERGE[col], row[col], value)
    return list(rows.values())


class Exporter:
    def __init__(self, client: redis.Redis, store: Store, settings: ExporterSettings):
        self.r = client
        self.store = store
        self.s = settings
        self.consumer = settings.exporter_id
        self.m = prom.exporter_metrics()
        self._recovering = True  # first read our own pending entries (a previous life's)
        self._next_takeover = 0.0
        self._next_trim = 0.0
        self.rows_written = 0
        self.events_read = 0

    def ensure_group(self) -> None:
        try:
            # From the start of the stream: events emitted before any exporter ran count too.
            self.r.xgroup_create(keys.EVENTS, keys.EVENTS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: threading.Event | None = None, *, burst: bool = False) -> None:
        """Export until ``stop`` is set; ``burst``: until nothing is left to read."""
        stop = stop or threading.Event()
        outage = Outage(f"exporter {self.consumer}", log)
        while not stop.is_set():
            try:
                self.ensure_group()
                break
            except UNAVAILABLE as exc:
                stop.wait(outage.failed(exc))
        log.info("exporter %s reading %s (group %s)", self.consumer, keys.EVENTS, keys.EVENTS_GROUP)
        while not stop.is_set():
            try:
                n = self.step(block=not burst)
                outage.ok()
            except UNAVAILABLE as exc:
                refresh_topology(self.r)  # a Cluster failing over: the next try goes to the new primary
                stop.wait(outage.failed(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - the store is down or refused the batch: retry it
                self._recovering = True
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    # Redis came back without the stream (restarted with no persistence,
                    # or flushed): make the group again and go on with what arrives now.
                    log.warning("the consumer group %s is gone (Redis lost %s); creating it again",
                                keys.EVENTS_GROUP, keys.EVENTS)
                    try:
                        self.ensure_group()
                    except UNAVAILABLE:
                        pass  # the next step finds Redis away and waits
                    continue
                if isinstance(exc, redis.ResponseError) and str(exc).startswith("UNBLOCKED"):
                    # A failover ended its blocking read (the primary became a replica):
                    # read again where the stream is now.
                    refresh_topology(self.r)
                    continue
                log.exception("writing a batch failed; its events stay pending and are retried")
                stop.wait(2.0)
                continue
            if burst and n == 0 and not self._recovering:
                self._trim(force=True)
                return

    def step(self, *, block: bool = True) -> int:
        """Read one batch, write it, acknowledge it; returns how many events it held."""
        entries = self._read(block)
        if not entries:
            self._trim()
            return 0
        ids = [entry_id for entry_id, _ in entries]
        events = []
        for entry_id, fields in entries:
            try:
                events.append(LifecycleEvent.from_fields(fields))
            except (KeyError, ValueError) as exc:
                log.warning("skipping malformed event %s (%s): %r", entry_id, exc, fields)
        rows = assemble(events)
        if rows:
            with self.m.insert.time():
                self.store.insert(rows)
        self.r.xack(keys.EVENTS, keys.EVENTS_GROUP, *ids)
        self.events_read += len(events)
        self.rows_written += len(rows)
        self.m.events.inc(len(events))
        self.m.rows.inc(len(rows))
        self._trim()
        return len(entries)

    # -- reading ------------------------------------------------------------------

    def _read(self, block: bool) -> list[tuple[str, dict]]:
        if self._recovering:
            entries = self._pending_of_mine()
            if entries:
                return entries
            self._recovering = False
        entries = self._take_over()
        if entries:
            return entries
        entries: list[tuple[str, dict]] = []
        deadline = time.monotonic() + self.s.flush_s
        while len(entries) < self.s.exporter_batch:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            if wait_ms <= 0 or (not block and entries):
                break
            got = self.r.xreadgroup(keys.EVENTS_GROUP, self.consumer, {keys.EVENTS: ">"},
                                    count=self.s.exporter_batch - len(entries), block=wait_ms if block else None)
            if not got:
                break
            entries += got[0][1]
        return entries

    def _pending_of_mine(self) -> list[tuple[str, dict]]:
        """Entries this consumer read before and never acknowledged (it died, or the
        insert failed), oldest first."""
        got = self.r.xreadgroup(keys.EVENTS_GROUP, self.consumer, {keys.EVENTS: "0"}, count=self.s.exporter_batch)
        entries = got[0][1] if got else []
        return self._drop_trimmed(entries)

    def _take_over(self) -> list[tuple[str, dict]]:
        """Entries another exporter read and left unacknowledged for too long (it died)."""
        now = time.monotonic()
        if now < self._next_takeover:
            return []
        self._next_takeover = now + self.s.exporter_claim_idle_s / 2
        res = self.r.xautoclaim(keys.EVENTS, keys.EVENTS_GROUP, self.consumer,
                                min_idle_time=int(self.s.exporter_claim_idle_s * 1000), start_id="0-0",
                                count=self.s.exporter_batch)
        entries, deleted = res[1], (res[2] if len(res) > 2 else [])
        if deleted:
            self._lost(deleted)
        if entries:
            log.warning("took over %d events left unacknowledged by a dead exporter", len(entries))
            self._next_takeover = 0.0  # there may be more
        return self._drop_trimmed(entries)

    def _drop_trimmed(self, entries: list) -> list[tuple[str, dict]]:
        kept = [(i, f) for i, f in entries if f]
        gone = [i for i, f in entries if not f]
        if gone:
            self._lost(gone)
        return kept

    def _lost(self, ids: list[str]) -> None:
        log.warning("%d events were trimmed from the stream before they were exported (raise "
                    "INFERSTACK_EVENTS_MAXLEN or keep an exporter running)", len(ids))
        self.m.lost.inc(len(ids))
        self.r.xack(keys.EVENTS, keys.EVENTS_GROUP, *ids)

    def _trim(self, force: bool = False) -> None:
        """Drop entries every consumer of the group has acknowledged (every few seconds)."""
        now = time.monotonic()
        if now < self._next_trim and not force:
            return
        self._next_trim = now + 5.0
        pending = self.r.xpending(keys.EVENTS, keys.EVENTS_GROUP)
        if pending["pending"]:
            min_id = pending["min"]
        else:
            groups = {g["name"]: g for g in self.r.xinfo_groups(keys.EVENTS)}
            min_id = groups[keys.EVENTS_GROUP]["last-delivered-id"]
        if min_id and min_id != "0-0":
            self.r.xtrim(keys.EVENTS, minid=min_id, approximate=True)


def main(settings: ExporterSettings | None = None) -> None:
    settings = settings or ExporterSettings()
    logging.basicConfig(level=os.environ.get("INFERSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s exporter %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    store = None
    while store is None and not stop.is_set():
        try:
            store = open_store(settings)
        except Exception as exc:  # noqa: BLE001 - ClickHouse may still be starting
            log.warning("cannot open the metrics store (%s); retrying in 2 s", exc)
            stop.wait(2.0)
    if store is None:
        return
    client = sync_client(settings.redis)
    if settings.metrics_port:
        models = Registry.load(settings.models_file).names()
        # The one place the queue depth is exported (see metrics/prom.py).
        REGISTRY.register(prom.QueueDepth(lambda: queue.depths(client, models)))
        prom.serve(settings.metrics_port, settings.metrics_host)
        log.info("Prometheus metrics (with the queue depth of %d models) on %s:%d/metrics", len(models),
                 settings.metrics_host, settings.metrics_port)
    exporter = Exporter(client, store, settings)
    try:
        exporter.run(stop)
    finally:
        store.close()
        log.info("exporter stopped after %d events, %d rows", exporter.events_read, exporter.rows_written)


if __name__ == "__main__":
    main()
