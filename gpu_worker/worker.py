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
from broker.connection import check_server, sync_client
from gpu_worker.demand import JOB_MODALITIES, DemandWatcher
from gpu_worker.engine import Engine
from gpu_worker.io import CancelListener, Claimer, Heartbeat, Publisher
from gpu_worker.manager import GiB, MemoryProbe, ModelManager, NotEnoughMemory
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


MODALITY_PACKAGES = {
    Modality.TEXT: ("transformers",),
    Modality.VISION: ("transformers", "PIL"),
    Modality.SPEECH: ("kokoro", "misaki"),
    Modality.IMAGE: ("diffusers", "PIL"),
    Modality.VIDEO: ("diffusers", "imageio_ffmpeg"),
}
"""Python packages each modality's engine imports; a worker without them cannot serve it."""


def missing_packages(spec: ModelSpec) -> list[str]:
    import importlib.util

    return [p for p in MODALITY_PACKAGES[spec.modality] if importlib.util.find_spec(p) is None]


def engine_available(spec: ModelSpec, settings: WorkerSettings) -> bool:
    return not missing_packages(spec) and modelstore.available(spec, settings.cache_dir)


def build_engine(spec: ModelSpec, settings: WorkerSettings, device: torch.device, model_dir=None) -> Engine:
    from gpu_worker.text.runner import pick_dtype

    model_dir = model_dir or modelstore.resolve(spec, settings.cache_dir)
    dtype = pick_dtype(settings.dtype or spec.dtype, device)
    if device.type == "cpu" and dtype is torch.float16:
        dtype = torch.float32  # fp16 registry dtypes are for GPUs; CPUs lack most half kernels
    max_batch = settings.max_batch or spec.max_batch
    if spec.modality is Modality.TEXT:
        from gpu_worker.text.engine import TextEngine

        return TextEngine(spec, model_dir, device=device, dtype=dtype, max_seqs=settings.max_batch,
                          max_prefill_tokens=settings.max_prefill_tokens, static=settings.batching == "static",
                          kv_cache_bytes=settings.kv_cache_bytes,
                          kv_dram_bytes=settings.kv_dram_bytes if settings.kv_reuse else 0,
                          prefix_min_hits=settings.prefix_min_hits)
    if spec.modality is Modality.VISION:
        from gpu_worker.vision.engine import VisionEngine

        return VisionEngine(spec, model_dir, device=device, dtype=dtype, max_batch=max_batch)
    if spec.modality is Modality.SPEECH:
        from gpu_worker.media.speech import SpeechEngine

        return SpeechEngine(spec, model_dir, device=device, max_batch=max_batch)
    if spec.modality is Modality.IMAGE:
        from gpu_worker.media.image import ImageEngine

        return ImageEngine(spec, model_dir, device=device, dtype=dtype, max_batch=max_batch)
    if spec.modality is Modality.VIDEO:
        from gpu_worker.media.video import VideoEngine

        return VideoEngine(spec, model_dir, device=device, dtype=dtype, max_batch=max_batch)
    raise NotImplementedError(f"{spec.name}: no engine for modality {spec.modality}")


def make_manager(registry: Registry, settings: WorkerSettings, device: torch.device) -> ModelManager:
    budget = settings.memory_budget_gb
    return ModelManager(
        registry, lambda spec: build_engine(spec, settings, device), probe=MemoryProbe(device),
        budget_bytes=None if budget is None else int(budget * GiB),
        reserve_bytes=int(settings.memory_reserve_gb * GiB), serves=settings.serve_names,
    )


class Worker:
    def __init__(self, settings: WorkerSettings, sched: SchedulerSettings, models: ModelManager | dict[str, Engine],
                 device: torch.device):
        self.s = settings
        self.id = settings.worker_id
        if not isinstance(models, ModelManager):  # engines built by the caller (tests, tools)
            manager = make_manager(Registry.load(settings.models_file), settings, device)
            for name, engine in models.items():
                manager.add_loaded(name, engine)
            models = manager
        self.models = models
        self.engines = models  # a Mapping of the ready engines, pinned while iterated
        self.device = device
        self._servable: list[str] = []
        self._servable_at = 0.0
        redis = settings.redis  # standalone, sentinel or cluster (broker.connection)
        self.r = sync_client(redis)
        self.fq = FairQueue(self.r, sched)
        self.stopping = threading.Event()   # stop claiming
        self.halt = threading.Event()       # stop stepping
        self.wake = threading.Event()
        self.started_at = time.time()
        self.publisher = Publisher(sync_client(redis), self.fq, self.id, on_error=lambda e: None,
                                   index_ttl_s=settings.heartbeat_ttl_s, events_maxlen=settings.events_maxlen)
        self.metrics_server = None
        self.claimer = Claimer(sync_client(redis), FairQueue(sync_client(redis), sched),
                               self.id, self.engines, self.wake, self.publisher, self.stopping)
        self.heartbeat = Heartbeat(sync_client(redis), self.fq, self.id, self.engines, self.info,
                                   settings.heartbeat_s, settings.heartbeat_ttl_s, self.publisher, self.halt)
        self.cancels = CancelListener(sync_client(redis), self.engines, self.halt)
        self.jobs = None
        if any(self.models.registry[n].modality in JOB_MODALITIES for n in self.servable()):
            from gpu_worker.media.jobs import JobConsumer

            if settings.rq_redis is None:
                log.warning("media jobs are off: rq cannot use the Redis Cluster; set INFERSTACK_RQ_REDIS_URL")
            else:
                self.jobs = JobConsumer(settings.rq_redis, sync_client(redis), self.id, self.models, self.stopping)
        self.demand = DemandWatcher(sync_client(redis), self.id, self.models, self.servable,
                                    settings.heartbeat_s, settings.heartbeat_ttl_s, self.stopping,
                                    rq_client=self.jobs.conn if self.jobs else None)

    def servable(self) -> list[str]:
        """Models this worker could load (weights and packages here, fits its memory);
        rechecked every 30 s, since weights can appear on the host."""
        if time.monotonic() - self._servable_at > 30:
            on_gpu = self.device.type == "cuda"
            self._servable = self.models.servable(
                lambda spec: spec.device in ("any", "cuda" if on_gpu else "cpu") and engine_available(spec, self.s))
            self._servable_at = time.monotonic()
        return self._servable

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
            "states": self.models.states(),
            "can_load": self.servable(),
            "registry": self.models.registry.names(),
            "free_memory_bytes": int(free),
            "total_memory_bytes": int(total),
            "model_free_bytes": self.models.free_bytes(),
            "model_reclaimable_bytes": self.models.reclaimable_bytes(),
            "model_capacity_bytes": self.models.capacity_bytes(),
            "running": {m: len(e.request_ids()) for m, e in self.engines.items()},
            "tokens_generated": sum(getattr(e, "tokens_generated", 0) for e in self.engines.values()),
            "preemptions": sum(getattr(e, "preemptions", 0) for e in self.engines.values()),
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
            self.metrics_server = prom.serve(self.s.metrics_port, self.s.metrics_host)
            log.info("worker %s: Prometheus metrics on %s:%d/metrics", self.id, self.s.metrics_host,
                     self.s.metrics_port)
        step_seconds = prom.worker_metrics().step
        check_server(self.r)
        for t in (self.publisher, self.heartbeat, self.cancels):
            t.start()
        self.heartbeat.beat()  # visible (and /ready) before the first claim
        self.claimer.start()
        self.demand.start()
        if self.jobs is not None:
            self.jobs.start()
        log.info("worker %s serving %s on %s (may load: %s)", self.id, ", ".join(self.engines) or "nothing yet",
                 self.device, ", ".join(self.servable()) or "nothing else")
        drain_deadline = None
        idle_since = None
        try:
            while not self.halt.is_set():
                busy = False
                for model, engine in self.engines.items():
                    if engine.has_work():
                        self.models.touch(model)
                        try:
                            with step_seconds.labels(model).time():
                                engine.step(self.publisher.submit)
                        except Exception as exc:  # noqa: BLE001 - hand the batch back, keep the worker
                            log.exception("%s: engine step failed; handing its requests back to the queue", model)
                            engine.requeue_all(f"{type(exc).__name__}: {exc}", self.publisher.submit)
                            self.claimer.back_off(self.s.heartbeat_s)
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
                    ) and (self.jobs is None or self.jobs.idle()):
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
        if self.jobs is not None and self.jobs.is_alive():
            self.jobs.join(timeout=10)
        self.models.stop()
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
    manager = make_manager(registry, settings, device)
    for name in settings.model_names:
        spec = registry.get(name)
        if spec is None:
            raise SystemExit(f"unknown model {name!r}; registry {settings.models_file} has {registry.names()}")
        try:
            log.info("loading %s on %s", name, device)
            manager.load(name)
        except (modelstore.ModelUnavailable, NotEnoughMemory) as exc:
            log.error("skipping %s", exc)
    worker = Worker(settings, SchedulerSettings(), manager, device)
    if not len(manager) and not worker.servable():
        raise SystemExit("no model could be loaded and none can be loaded on demand; see the errors above")
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    worker.run()
