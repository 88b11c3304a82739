"""Prometheus metrics, one registry per process (the client's default), conventional
names: counters end in ``_total``, durations are histograms in seconds.

Each process kind defines its metrics once (``api_metrics()``, ``worker_metrics()``,
``exporter_metrics()``; cached, because tests run several apps in one process).
Values that live elsewhere — queue depths in Redis, a worker's batch and KV cache —
are read when scraped, not mirrored.

The queue depth is deployment-wide state, so exactly one kind of process exports it:
the metrics exporter (``inferstack exporter`` with ``INFERSTACK_METRICS_PORT``). Were
every API replica to export it, a ``sum`` over replicas would count each waiting
request once per replica; an autoscaler reads ``max by (model, tier)``, which stays
right with several exporters too.

Several API processes behind one port (``INFERSTACK_API_WORKERS`` > 1) share their
counters and histograms through the client's multiprocess mode:
:func:`prepare_multiprocess` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before the processes start, and :func:`exposition` then merges every process's files.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class ApiMetrics:
    requests: Counter
    prompt_tokens: Counter
    generation_tokens: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram


@dataclass(frozen=True)
class WorkerMetrics:
    queue_wait: Histogram
    claimed: Counter
    released: Counter
    generated_tokens: Counter
    step: Histogram
    publish: Histogram
    preemptions: Counter


@dataclass(frozen=True)
class ExporterMetrics:
    events: Counter
    rows: Counter
    lost: Counter
    insert: Histogram


@functools.cache
def api_metrics() -> ApiMetrics:
    return ApiMetrics(
        requests=Counter("inferstack_requests", "Text requests by outcome (finished, failed, cancelled, rejected).",
                         ["model", "tier", "status"]),
        prompt_tokens=Counter("inferstack_prompt_tokens", "Prompt tokens of admitted requests.", ["model"]),
        generation_tokens=Counter("inferstack_generation_tokens", "Output tokens relayed to clients.", ["model"]),
        ttft=Histogram("inferstack_time_to_first_token_seconds", "Admission to first token, seen by the API.",
                       ["model"], buckets=LATENCY_BUCKETS),
        itl=Histogram("inferstack_inter_token_latency_seconds", "Gap between consecutive tokens, seen by the API.",
                      ["model"], buckets=ITL_BUCKETS),
        e2e=Histogram("inferstack_e2e_request_latency_seconds", "Admission to last token of finished requests.",
                      ["model"], buckets=E2E_BUCKETS),
    )


@functools.cache
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics(
        queue_wait=Histogram("inferstack_queue_wait_seconds", "Admission to claim by a worker.", ["model", "tier"],
                             buckets=LATENCY_BUCKETS),
        claimed=Counter("inferstack_worker_requests_claimed", "Requests claimed from the queue.", ["model"]),
        released=Counter("inferstack_worker_requests_released",
                         "Requests whose lease the worker released, by outcome (finished, aborted, failed; "
                         "preempted or requeued: handed back to the queue).", ["model", "outcome"]),
        generated_tokens=Counter("inferstack_worker_generated_tokens", "Output tokens generated.", ["model"]),
        step=Histogram("inferstack_engine_step_seconds", "One engine step (prefill chunk and/or decode).", ["model"],
                       buckets=STEP_BUCKETS),
        publish=Histogram("inferstack_publish_round_trip_seconds",
                          "One publisher round trip (token logs, PUBLISH, releases, events).", buckets=STEP_BUCKETS),
        preemptions=Counter("inferstack_preemptions",
                            "Running requests preempted for a waiting one, by reason (tier: a higher tier waited; "
                            "share: a user under its fair share of the batch waited).", ["model", "reason"]),
    )


@functools.cache
def exporter_metrics() -> ExporterMetrics:
    return ExporterMetrics(
        events=Counter("inferstack_exporter_events", "Lifecycle events read from the stream."),
        rows=Counter("inferstack_exporter_rows", "Request rows written to the store."),
        lost=Counter("inferstack_exporter_lost_events", "Events trimmed from the stream before they were read."),
        insert=Histogram("inferstack_exporter_insert_seconds", "One batch insert into the store.",
                         buckets=STEP_BUCKETS),
    )


# -- scrape-time gauges ---------------------------------------------------------


class QueueDepth:
    """``inferstack_queue_depth{model, tier}``: requests waiting, read from Redis by
    ``read()`` when scraped. A failed read drops the family from that scrape (an
    absent series, not a false zero that would scale workers down)."""

    def __init__(self, read: Callable[[], dict[str, dict[str, int]]]):
        self.read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            depths = self.read()
        except Exception as exc:  # noqa: BLE001 - Redis down: the rest of the metrics still matter
            log.warning("queue depth unavailable this scrape: %s", exc)
            return []
        g = GaugeMetricFamily("inferstack_queue_depth", "Requests waiting, per model and tier.",
                              labels=["model", "tier"])
        for model, tiers in sorted(depths.items()):
            for tier, n in tiers.items():
                g.add_metric([model, tier], n)
        return [g]


class EngineGauges:
    """Running batch, KV cache bytes and models loaded of the engines in this process,
    read from the engines when scraped (``Engine.gauges()``)."""

    def __init__(self):
        self._engines: dict[str, dict] = {}

    def attach(self, owner: str, engines: dict) -> None:
        self._engines[owner] = engines

    def detach(self, owner: str) -> None:
        self._engines.pop(owner, None)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        batch = GaugeMetricFamily("inferstack_batch_size", "Sequences in the running batch.", labels=["model"])
        kv = GaugeMetricFamily("inferstack_kv_cache_bytes", "Bytes held by the KV cache.", labels=["model"])
        loaded = GaugeMetricFamily("inferstack_models_loaded", "Models this worker process has loaded.")
        store = GaugeMetricFamily("inferstack_kv_store_bytes",
                                  "Bytes of session and prefix KV caches kept in DRAM.", labels=["model"])
        reuse = {
            "kv_store_hits": CounterMetricFamily("inferstack_kv_store_hits", "Prompts that reused a stored KV cache.",
                                                 labels=["model"]),
            "kv_store_misses": CounterMetricFamily("inferstack_kv_store_misses",
                                                   "Prompts that found no stored KV cache.", labels=["model"]),
            "kv_store_tokens_saved": CounterMetricFamily("inferstack_kv_store_tokens_saved",
                                                         "Prompt tokens restored instead of prefilled.",
                                                         labels=["model"]),
        }
        totals: dict[str, dict[str, float]] = {}
        for engines in list(self._engines.values()):
            for model, engine in list(engines.items()):
                t = totals.setdefault(model, {"batch_size": 0.0, "kv_cache_bytes": 0.0})
                for name, value in engine.gauges().items():
                    t[name] = t.get(name, 0.0) + value
        for model, t in sorted(totals.items()):
            batch.add_metric([model], t["batch_size"])
            kv.add_metric([model], t["kv_cache_bytes"])
            if "kv_store_bytes" in t:
                store.add_metric([model], t["kv_store_bytes"])
                for name, family in reuse.items():
                    family.add_metric([model], t[name])
        loaded.add_metric([], len(totals))
        return [batch, kv, loaded, store, *reuse.values()]


@functools.cache
def engine_gauges() -> EngineGauges:
    gauges = EngineGauges()
    REGISTRY.register(gauges)
    return gauges


# -- exposition -------------------------------------------------------------------


def prepare_multiprocess() -> tuple[str, bool]:
    """Before starting several API processes: a clean directory for their metric files
    (``PROMETHEUS_MULTIPROC_DIR`` if set, else a new temporary one, ``created``)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
        return path, False
    path = tempfile.mkdtemp(prefix="inferstack-prometheus-")
    os.environ[MULTIPROC_ENV] = path
    return path, True


def cleanup_multiprocess(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def exposition() -> bytes:
    """The text format of this process's registry — or, in multiprocess mode, of every
    process's files merged."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def serve(port: int, host: str = "127.0.0.1"):
    """Expose the default registry on ``host:port`` (workers, exporter); returns the
    server. Loopback unless configured: these metrics carry no authentication."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    return server
