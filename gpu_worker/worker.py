"""The worker process: load engines, then loop — take claimed work, step every
engine that has some, hand results to the publisher. Claiming, publishing,
heartbeats and cancellations run beside this loop (``gpu_worker.io``)."""

from __future__ import annotations

import atexit
import gc
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
from gpu_worker.engine import Engine, FatalEngineError, Outgoing
from gpu_worker.io import CancelListener, Claimer, Heartbeat, Publisher
from gpu_worker.manager import GiB, MemoryProbe, ModelManager, NotEnoughMemory
from gpu_worker.precision import choose_dtype
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


def engine_dtype(spec: ModelSpec, settings: WorkerSettings, device: torch.device) -> torch.dtype:
    """The dtype a model runs in on ``device`` (``gpu_worker.precision``): every rank of a
    tensor-parallel group picks the same."""
    return choose_dtype(device, spec.dtype, settings.dtype).dtype


def build_engine(spec: ModelSpec, settings: WorkerSettings, device: torch.device, model_dir=None,
                 tp_group=None) -> Engine:
    """``tp_group``: this process leads a tensor-parallel group (``gpu_worker.group``)."""
    model_dir = model_dir or modelstore.resolve(spec, settings.cache_dir)
    choice = choose_dtype(device, spec.dtype, settings.dtype)
    dtype = choice.dtype
    if spec.modality is not Modality.SPEECH:
        log.info("%s: %s on %s (%s)", spec.name, choice.name, device, choice.reason)
    max_batch = settings.max_batch or spec.max_batch
    if spec.modality is Modality.TEXT:
        from gpu_worker.text.engine import TextEngine

        return TextEngine(spec, model_dir, device=device, dtype=dtype, max_seqs=settings.max_batch,
                          max_prefill_tokens=settings.max_prefill_tokens, static=settings.batching == "static",
                          kv_cache_bytes=settings.kv_cache_bytes,
                          kv_dram_bytes=settings.kv_dram_bytes if settings.kv_reuse else 0,
                          prefix_min_hits=settings.prefix_min_hits, tp_group=tp_group,
                          runner_options=settings.runner_options)
    if tp_group is not None:
        raise NotImplementedError(f"{spec.name}: tensor parallelism runs text models only")
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


def make_manager(registry: Registry, settings: WorkerSettings, device: torch.device, tp_group=None) -> ModelManager:
    budget = settings.memory_budget_gb
    return ModelManager(
        registry, lambda spec: build_engine(spec, settings, device, tp_group=tp_group), probe=MemoryProbe(device),
        budget_bytes=None if budget is None else int(budget * GiB),
        reserve_bytes=int(settings.memory_reserve_gb * GiB),
        serves=set(settings.model_names) if tp_group else settings.serve_names, shards=settings.tp_size,
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
        if 0 < sched.worker_dead_s < 2 * settings.heartbeat_s:
            log.warning("INFERSTACK_WORKER_DEAD_S=%g is under two heartbeats (INFERSTACK_HEARTBEAT_S=%g): live "
                        "workers will be taken for dead", sched.worker_dead_s, settings.heartbeat_s)
        self.stopping = threading.Event()   # stop claiming
        self.halt = threading.Event()       # stop stepping
        self.exit_code = 0
        """1 after a fatal engine failure (a tensor-parallel peer lost): restart me."""
        self.wake = threading.Event()
        self.started_at = time.time()
        self.publisher = Publisher(sync_client(redis), self.fq, self.id, on_lost=self._lost,
                                   index_ttl_s=settings.heartbeat_ttl_s, events_maxlen=settings.events_maxlen,
                                   max_buffered=settings.outage_buffer_events, give_up_s=settings.redis_outage_s,
                                   on_give_up=self._drop_everything)
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

    def _lost(self, model: str, request_ids: list[str]) -> None:
        """The publisher found requests this worker no longer owns: stop them now."""
        engine = self.engines.get(model)
        if engine is not None:
            for rid in request_ids:
                engine.abort(rid)

    def _drop_everything(self) -> None:
        """Redis stayed away past the outage limit: the clients' streams have ended, so
        stop what this worker holds. Their releases go out once Redis answers, so they
        are not requeued and run again for nobody."""
        for engine in self.engines.values():
            for rid in engine.request_ids():
                engine.abort(rid)

    def servable(self) -> list[str]:
        """Models this worker could load (weights and packages here, fits its memory);
        rechecked every 30 s, since weights can appear on the host."""
        if time.monotonic() - self._servable_at > 30:
            on_gpu = self.device.type == "cuda"
            # A model the registry shards over N devices needs a group of at least N.
            self._servable = self.models.servable(
                lambda spec: spec.device in ("any", "cuda" if on_gpu else "cpu") and engine_available(spec, self.s)
                and spec.tensor_parallel <= self.s.tp_size)
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
            "host_id": self.s.host_id,
            "mode": "tp" if self.s.tp_size > 1 else "individual",
            "tp_size": self.s.tp_size,
            "devices": self.s.tp_devices.split(",") if self.s.tp_devices else [str(self.device)],
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
                if self.publisher.backlogged:  # Redis away and the buffer full: wait for it
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                busy = False
                for model, engine in self.engines.items():
                    if engine.has_work():
                        self.models.touch(model)
                        try:
                            with step_seconds.labels(model).time():
                                engine.step(self.publisher.submit)
                        except FatalEngineError as exc:  # shutdown hands its requests back
                            log.error("%s: %s; handing every request back to the queue and stopping", model, exc)
                            self.exit_code = 1
                            self.halt.set()
                            break
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

    def hand_back(self) -> None:
        """Hand every request this worker still holds back to the queue (the drain timed
        out, or the engine failed for good): each resumes on the next worker that claims
        it, from its output log. Runs once nothing steps, the publisher has written every
        event and the heartbeat renews no lease."""
        kind, why = (("failed", "its tensor-parallel group broke") if self.exit_code
                     else ("drained", "it stopped before the request finished"))
        out: list[Outgoing] = []
        for model, engine in self.engines.items():
            if engine.request_ids():
                engine.requeue_all(f"the worker handed it back: {why}", out.extend, kind)
        if out:
            try:
                self.publisher.ship_now(out)
                log.warning("handed %d unfinished requests back to the queue (%s)", len(out), kind)
            except Exception:  # noqa: BLE001 - their leases lapse and the reaper requeues them
                log.exception("could not hand back %d requests; their leases will lapse", len(out))

    def request_stop(self) -> None:
        """First call: stop claiming and let running requests finish (up to the drain
        timeout; unfinished ones go back to the queue). Second call: stop now."""
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
        if self.heartbeat.is_alive():
            self.heartbeat.join(timeout=self.s.heartbeat_s + 5)
        self.hand_back()
        prom.engine_gauges().detach(self.id)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.jobs is not None and self.jobs.is_alive():
            self.jobs.join(timeout=10)
        self.models.stop()
        self.models.close()
        try:
            self.r.zrem(keys.WORKERS, self.id)
            self.r.delete(keys.worker(self.id))
        except Exception:  # noqa: BLE001
            pass
        log.info("worker %s stopped", self.id)


def main(settings: WorkerSettings | None = None) -> None:
    settings = settings or WorkerSettings()
    # Everything the worker leaves behind is in Redis by the time it exits; the
    # interpreter's final garbage collection over transformers' and torch's objects
    # would take seconds more (8 s measured on a busy 2-core host), holding up restarts
    # and mode switches. Frozen objects are skipped by it.
    atexit.register(gc.freeze)
    logging.basicConfig(level=os.environ.get("INFERSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    tracing.setup("inferstack-worker", settings.otlp_endpoint)
    registry = Registry.load(settings.models_file)
    device = pick_device(settings.device)
    group = None
    if settings.tp_size > 1:
        from gpu_worker import group as tp

        tp.group_model(settings, registry)
        if settings.tp_rank > 0:
            raise SystemExit(tp.run_follower(settings, registry, device))
        group = tp.join(settings, device)
    manager = make_manager(registry, settings, device, tp_group=group)
    for name in settings.model_names:
        spec = registry.get(name)
        if spec is None:
            raise SystemExit(f"unknown model {name!r}; registry {settings.models_file} has {registry.names()}")
        if spec.tensor_parallel > settings.tp_size:
            log.error("skipping %s: it runs as a tensor-parallel group of %d devices (switch a host to it: "
                      "`inferstack mode HOST tp --model %s`)", name, spec.tensor_parallel, name)
            continue
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
    if worker.exit_code:
        raise SystemExit(worker.exit_code)
