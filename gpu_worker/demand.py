"""Demand-driven loading: when a model has waiting work and no live worker serves it
(or is loading it), the best-placed worker loads it.

Every worker runs the same rule on the same heartbeats (``choose_worker``, a pure
function), and the chosen one takes a short ``SET NX`` claim before loading, so a
stale view on two workers still loads the model once.
"""

from __future__ import annotations

import logging
import threading
import time

from broker import keys
from broker.messages import Tier, decode_heartbeat
from inferstack.registry import Modality, ModelSpec
from scheduler.queue import depths

log = logging.getLogger(__name__)

JOB_MODALITIES = (Modality.IMAGE, Modality.VIDEO)
"""Served from rq queues; everything else waits in the fair queue."""


def choose_worker(spec: ModelSpec, workers: list[dict]) -> str | None:
    """The worker that should load ``spec``: among live workers that could hold it
    (``can_load``) and match its device affinity, GPU workers first unless the
    registry pins it to CPU, then the most memory it could free, then the id."""
    eligible = []
    for w in workers:
        if spec.name not in w.get("can_load", []):
            continue
        on_gpu = str(w.get("device", "cpu")).startswith("cuda")
        if (spec.device == "cuda" and not on_gpu) or (spec.device == "cpu" and on_gpu):
            continue
        eligible.append((not on_gpu, -int(w.get("model_reclaimable_bytes", 0)), str(w["id"])))
    return min(eligible)[2] if eligible else None


def read_workers(client, live_window_s: float) -> list[dict]:
    """Live workers' heartbeats (sync twin of ``api.workers.live_workers``)."""
    ids = client.zrangebyscore(keys.WORKERS, time.time() - live_window_s, "+inf")
    pipe = client.pipeline(transaction=False)
    for wid in ids:
        pipe.hgetall(keys.worker(wid))
    return [decode_heartbeat(raw) for raw in pipe.execute() if raw]


def waiting_work(client, specs: list[ModelSpec], rq_client=None) -> dict[str, int]:
    """Requests or jobs waiting per model: the fair queue's counters (one round trip),
    the rq queues' lengths on ``rq_client`` (another; none without one)."""
    jobs = [s.name for s in specs if s.modality in JOB_MODALITIES]
    queued = [s.name for s in specs if s.modality not in JOB_MODALITIES]
    out = {model: sum(by_tier.values()) for model, by_tier in depths(client, queued).items()} if queued else {}
    if jobs and rq_client is not None:
        pipe = rq_client.pipeline(transaction=False)
        for model in jobs:
            for tier in Tier:
                pipe.llen(keys.RQ_QUEUE_PREFIX + keys.media_queue(model, tier))
        lengths = iter(pipe.execute())
        out.update({model: sum(int(next(lengths)) for _ in Tier) for model in jobs})
    return {s.name: out.get(s.name, 0) for s in specs}


def served_or_loading(workers: list[dict]) -> set[str]:
    names: set[str] = set()
    for w in workers:
        names.update(w.get("models", []))
        names.update(w.get("states", {}))
    return names


class DemandWatcher(threading.Thread):
    """Every period: models this worker could load that have waiting work and no live
    worker -> if this worker is the best placed, claim and load."""

    def __init__(self, client, worker_id: str, manager, servable, period_s: float, live_window_s: float,
                 stopping: threading.Event, rq_client=None):
        super().__init__(name="demand", daemon=True)
        self.r, self.worker_id, self.manager = client, worker_id, manager
        self.rq = rq_client
        """Where media jobs wait (rq); None: this worker sees no media demand."""
        self.servable = servable
        """Callable -> names this worker could load (cached by the worker)."""
        self.period_s, self.live_window_s, self.stopping = period_s, live_window_s, stopping
        self.claim_ttl_ms = int(max(30.0, 10 * period_s) * 1000)

    def run(self) -> None:
        while not self.stopping.wait(self.period_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a Redis blip must not stop demand loading
                log.exception("demand check failed")

    def check(self) -> list[str]:
        """Returns the models this call started loading."""
        candidates = [self.manager.registry[n] for n in self.servable() if self.manager.state(n) is None]
        if not candidates:
            return []
        waiting = waiting_work(self.r, candidates, self.rq)
        wanted = [s for s in candidates if waiting[s.name] > 0]
        if not wanted:
            return []
        workers = read_workers(self.r, self.live_window_s)
        taken = served_or_loading(workers)
        started = []
        for spec in wanted:
            if spec.name in taken or choose_worker(spec, workers) != self.worker_id:
                continue
            if not self.r.set(keys.load_claim(spec.name), self.worker_id, nx=True, px=self.claim_ttl_ms):
                continue
            log.info("%s: %d waiting and no worker serves it; loading it here", spec.name, waiting[spec.name])
            self.manager.request(spec.name)
            started.append(spec.name)
        return started
