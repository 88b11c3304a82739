"""The worker process: load engines, then loop — take claimed work, step every
engine that has some, hand results to the publisher. Claiming, publishing,
heartbeats and cancellations run beside this loop (``gpu_worker.io``)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import psutil
import torch

from broker import keys
from broker.connection import sync_client
from gpu_worker.engine import Engine
from gpu_worker.io import CancelListener, Claimer, Heartbeat, Publisher
from gpu_worker.settings import WorkerSettings
from inferstack import modelstore
from inferstack.registry import Modality, ModelSpec, Registry
from metrics import prom, tracing
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_engine(spec: ModelSpec, settings: WorkerSettings, device: torch.device, model_dir=None) -> Engine:
    from gpu_worker.text.runner import pick_dtype

    model_dir = model_dir or modelstore.resolve(spec, settings.cache_dir)
    dtype = pick_dtype(settings.dtype or spec.dtype, device)
    if spec.modality is Modality.TEXT:
        from gpu_worker.text.engine import TextEngine

        return TextEngine(spec, model_dir, device=device, dtype=dtype, max_seqs=settings.max_batch,
                          max_prefill_tokens=settings.max_prefill_tokens, static=settings.batching == "static",
                          kv_cache_bytes=settings.kv_cache_bytes,
                          kv_dram_bytes=settings.kv_dram_bytes if settings.kv_reuse else 0,
                          prefix_min_hits=settings.prefix_min_hits)
    raise NotImplementedError(f"{spec.name}: no engine for modality {spec.modality} yet")


class Worker:
    def __init__(self, settings: WorkerSettings, sched: SchedulerSettings, engines: dict[str, Engine],
                 device: torch.device):
        self.s = settings
        self.id = settings.worker_id
        self.engines = engines
        self.device = device
        self.r = sync_client(settings.redis_url)
        self.fq = FairQueue(self.r, sched)
        self.stopping = threading.Event()   # stop claiming
        self.halt = threading.Event()       # stop stepping
        self.wake = threading.Event()
        self.started_at = time.time()
        self.publisher = Publisher(sync_client(settings.redis_url), self.fq, self.id, on_error=lambda e: None,
                                   index_ttl_s=settings.heartbeat_ttl_s, events_maxlen=settings.events_maxlen)
        self.metrics_server = None
        self.claimer = Claimer(sync_client(settings.redis_url), FairQueue(sync_client(settings.redis_url), sched),
                               self.id, engines, self.wake, self.publisher, self.stopping)
        self.heartbeat = Heartbeat(sync_client(settings.redis_url), self.fq, self.id, engines, self.info,
                                   settings.heartbeat_s, settings.heartbeat_ttl_s, self.publisher, self.halt)
        self.cancels = CancelListener(sync_client(settings.redis_url), engines, self.halt)

    def info(self) -> dict:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        else:
            vm = psutil.virtual_memory()
            free, total = vm.available, vm.total
        return {
            "id": self.id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "models": list(self.engines),
            "free_memory_bytes": int(free),
            "total_memory_bytes": int(total),
            "running": {m: len(e.request_ids()) for m, e in self.engines.items()},
            "tokens_generated": sum(getattr(e, "tokens_generated", 0) for e in self.engines.values()),
            "publish_busy_s": round(self.publisher.busy_s, 6),
            "publish_round_trips": self.publisher.round_trips,
            "events_published": self.publisher.published,
            "kv": {m: e.kv_stats() for m, e in self.engines.items() if hasattr(e, "kv_stats")},
            "state": "draining" if self.stopping.is_set() else "ready",
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
        }

    def run(self, *, burst: bool = False) -> None:
        """Serve until stopped. ``burst``: stop once the queues and engines are empty
        (tests use it to run a worker deterministically to completion)."""
        prom.engine_gauges().attach(self.id, self.engines)
        if self.s.metrics_port:
            self.metrics_server = prom.serve(self.s.metrics_port)
            log.info("worker %s: Prometheus metrics on :%d/metrics", self.id, self.s.metrics_port)
        step_seconds = prom.worker_metrics().step
        for t in (self.publisher, self.heartbeat, self.cancels):
            t.start()
        self.heartbeat.beat()  # visible (and /ready) before the first claim
        self.claimer.start()
        log.info("worker %s serving %s on %s", self.id, ", ".join(self.engines), self.device)
        drain_deadline = None
        idle_since = None
        try:
            while not self.halt.is_set():
                busy = False
                for model, engine in self.engines.items():
                    if engine.has_work():
                        try:
                            with step_seconds.labels(model).time():
                                engine.step(self.publisher.submit)
                        except Exception as exc:  # noqa: BLE001 - fail the batch, keep the worker
                            log.exception("%s: engine step failed; failing its requests", model)
                            engine.fail_all(f"{type(exc).__name__}: {exc}", self.publisher.submit)
                        self.claimer.capacity_freed.set()
                        busy = True
                if busy:
                    idle_since = None
                    continue
                if self.stopping.is_set():
                    break
                if burst:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 0.5 and all(
                        sum(self.fq.depth(m).values()) == 0 for m in self.engines
                    ):
                        break
                self.wake.wait(0.05)
                self.wake.clear()
                if self.stopping.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + self.s.drain_timeout_s
        finally:
            self.shutdown()

    def request_stop(self) -> None:
        """First call: stop claiming and let running requests finish (up to the drain
        timeout; unfinished ones are requeued by lease expiry). Second call: stop now."""
        if self.stopping.is_set():
            self.halt.set()
            return
        self.stopping.set()
        timer = threading.Timer(self.s.drain_timeout_s, self.halt.set)
        timer.daemon = True
        timer.start()

    def shutdown(self) -> None:
        self.stopping.set()
        self.halt.set()
        self.publisher.stop()
        self.publisher.join(timeout=5)
        prom.engine_gauges().detach(self.id)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        try:
            self.r.zrem(keys.WORKERS, self.id)
            self.r.delete(keys.worker(self.id))
        except Exception:  # noqa: BLE001
            pass
        log.info("worker %s stopped", self.id)


def main(settings: WorkerSettings | None = None) -> None:
    settings = settings or WorkerSettings()
    logging.basicConfig(level=os.environ.get("INFERSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    tracing.setup("inferstack-worker", settings.otlp_endpoint)
    registry = Registry.load(settings.models_file)
    device = pick_device(settings.device)
    engines: dict[str, Engine] = {}
    for name in settings.model_names:
        spec = registry.get(name)
        if spec is None:
            raise SystemExit(f"unknown model {name!r}; registry {settings.models_file} has {registry.names()}")
        try:
            log.info("loading %s on %s", name, device)
            engines[name] = build_engine(spec, settings, device)
        except modelstore.ModelUnavailable as exc:
            log.error("skipping %s", exc)
    if not engines:
        raise SystemExit("no model could be loaded; see the errors above")
    worker = Worker(settings, SchedulerSettings(), engines, device)
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    worker.run()
