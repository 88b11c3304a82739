"""The in-process rq consumer of a worker's image and video models.

rq's own workers run one job at a time, forking per job; here the models stay loaded
and a batch of jobs for one model runs as one pipeline call. rq still does the
bookkeeping, through an rq ``SimpleWorker`` that this thread never lets ``work()``:
``prepare_execution`` / ``prepare_job_execution`` (status ``started``, the started
registry, the execution record) before the batch, and rq's finalizers after it, so
results and their TTL, failures, ``Retry`` and the registries behave exactly as with
``rq worker``. The rq job timeout is enforced between denoising steps (a CUDA kernel
cannot be interrupted by a signal, and this is not the main thread), as is
cancellation (``Job.cancel()`` from the API).

One loop: wait on every ready media model's queues (high tier first) -> take up to
``max_batch`` jobs of the model whose job came first -> run compatible jobs together,
publishing progress ("denoising step i of n") in job meta -> store the files with the
result TTL -> finish each job in rq -> tell a synchronously waiting API process.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.worker import SimpleWorker

from broker import keys, messages
from broker.connection import RedisTarget, sync_client
from broker.messages import JobEvent, MediaRequest, Tier
from gpu_worker.demand import JOB_MODALITIES

log = logging.getLogger(__name__)

JOB_FUNCTION = "gpu_worker.media.jobs.media_job"
"""The callable rq records for every media job."""


def media_job(request: dict) -> dict:
    """What rq would call for a media job. Inferstack workers never do: they run jobs
    in batches (``JobConsumer``); a plain ``rq worker`` on these queues fails the job
    with this message rather than loading a model per job."""
    raise RuntimeError("media jobs are run by inferstack workers (`inferstack worker`), not by `rq worker`")


def rq_queue(conn, model: str, tier: str) -> Queue:
    return Queue(keys.media_queue(model, tier), connection=conn, serializer=JSONSerializer)


@dataclass
class _Running:
    job: Job
    queue: Queue
    execution: object
    request: MediaRequest
    started: float


class JobConsumer(threading.Thread):
    def __init__(self, rq_redis: RedisTarget | str, replies, worker_id: str, manager, stopping: threading.Event, *,
                 poll_s: int = 1, progress_interval_s: float = 0.0):
        """``rq_redis``: where the jobs are (standalone or sentinel); ``replies``: a
        client of the shared Redis, where API processes wait for their jobs' ends."""
        super().__init__(name="jobs", daemon=True)
        self.conn = sync_client(rq_redis, decode_responses=False)  # rq keeps bytes (files, serialized jobs)
        self.replies = replies
        self.manager, self.stopping = manager, stopping
        self.poll_s, self.progress_interval_s = poll_s, progress_interval_s
        self.rq = SimpleWorker([], connection=self.conn, name=f"{worker_id}-jobs-{uuid.uuid4().hex[:6]}",
                               serializer=JSONSerializer)
        self.step_observers: list = []
        """Called as ``observer(job_id, step, steps)`` after each step's bookkeeping (tests
        use it to look at a job mid-run)."""
        self._busy = threading.Event()
        self.completed = 0

    def idle(self) -> bool:
        if self._busy.is_set():
            return False
        return all(rq_queue(self.conn, m, t).count == 0 for m in self._models() for t in Tier)

    def _models(self) -> list[str]:
        return [m for m in self.manager if self.manager.registry[m].modality in JOB_MODALITIES]

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        self.rq.register_birth()
        last_maintenance = 0.0
        try:
            while not self.stopping.is_set():
                try:
                    if time.monotonic() - last_maintenance > 60:
                        self.rq.clean_registries()  # requeue or fail jobs of workers that died
                        last_maintenance = time.monotonic()
                    self._round()
                except Exception:  # noqa: BLE001 - a Redis blip or a bad job must not stop the worker
                    log.exception("job round failed")
                    time.sleep(0.5)
        finally:
            self.rq.register_death()

    def _round(self) -> None:
        models = self._models()
        if not models:
            self.stopping.wait(0.2)
            return
        queues = [rq_queue(self.conn, m, t) for m in models for t in Tier]
        try:
            got = Queue.dequeue_any(queues, timeout=self.poll_s, connection=self.conn, serializer=JSONSerializer)
        except DequeueTimeout:
            self.rq.heartbeat()
            return
        if got is None:
            return
        job, queue = got
        model = job.args[0]["model"]
        engine = self.manager.pin(model)
        if engine is None:  # evicted between the wait and the pop: put it back in front
            queue.enqueue_job(job, at_front=True)
            return
        self._busy.set()
        try:
            self.manager.touch(model)
            batch = [(job, queue)]
            model_queues = [rq_queue(self.conn, model, t) for t in Tier]
            while len(batch) < engine.max_batch:
                more = Queue.dequeue_any(model_queues, timeout=None, connection=self.conn, serializer=JSONSerializer)
                if more is None:
                    break
                batch.append(more)
            self._run_batch(engine, batch)
        finally:
            self._busy.clear()
            self.manager.unpin(model)

    def _run_batch(self, engine, batch: list[tuple[Job, Queue]]) -> None:
        groups: dict[tuple, list[_Running]] = {}
        for job, queue in batch:
            if job.get_status() is JobStatus.CANCELED:
                continue
            execution = self.rq.prepare_execution(job)
            self.rq.prepare_job_execution(job)
            request = messages.from_dict(MediaRequest, job.args[0])
            running = _Running(job, queue, execution, request, time.monotonic())
            groups.setdefault(engine.batch_key(request), []).append(running)
        for group in groups.values():
            self._run_group(engine, group)

    def _run_group(self, engine, group: list[_Running]) -> None:
        alive = list(group)
        last_saved = 0.0

        def on_step(step: int, steps: int) -> bool:
            nonlocal last_saved
            for r in list(alive):
                if r.job.get_status() is JobStatus.CANCELED:
                    alive.remove(r)
                    self._cancelled(r)
                elif r.job.timeout and r.job.timeout > 0 and time.monotonic() - r.started > r.job.timeout:
                    alive.remove(r)
                    try:
                        raise JobTimeoutException(f"Task exceeded maximum timeout value ({r.job.timeout} seconds)")
                    except JobTimeoutException:
                        self._failed(r, sys.exc_info())
            now = time.monotonic()
            if step == steps or now - last_saved >= self.progress_interval_s:
                last_saved = now
                for r in alive:
                    r.job.meta["progress"] = {"step": step, "steps": steps}
                    r.job.save_meta()
            for r in alive:
                for observer in self.step_observers:
                    observer(r.job.id, step, steps)
            return bool(alive)

        log.info("%s: running %d job(s) as one batch", engine.model, len(group))
        try:
            outputs = engine.run([r.request for r in group], on_step)
        except Exception:  # noqa: BLE001 - the jobs fail (rq retries them); the worker goes on
            log.exception("%s: batch failed", engine.model)
            info = sys.exc_info()
            for r in alive:
                self._failed(r, info)
            return
        for r, files in zip(group, outputs):
            if r in alive:
                self._succeeded(r, files)

    # -- endings ----------------------------------------------------------------------

    def _succeeded(self, r: _Running, files) -> None:
        ttl = r.job.get_result_ttl(self.rq.default_result_ttl)
        key = keys.media_result(r.job.id)
        pipe = self.conn.pipeline(transaction=False)
        pipe.delete(key)
        pipe.hset(key, mapping={str(i): f.data for i, f in enumerate(files)})
        if ttl and ttl > 0:
            pipe.expire(key, ttl)
        pipe.execute()
        result = {"files": [{"index": i, "media_type": f.media_type, "bytes": len(f.data)} for i, f in enumerate(files)]}
        self.rq._finalize_success(r.job, r.queue, r.execution, result)  # rq's own success path (result TTL)
        self.completed += 1
        self._ended(r, "succeeded")

    def _failed(self, r: _Running, exc_info) -> None:
        self.rq._finalize_failure(r.job, r.queue, r.execution, exc_info)  # rq's own failure path (Retry)
        if r.job.get_status() is JobStatus.FAILED:
            self._ended(r, "failed")

    def _cancelled(self, r: _Running) -> None:
        with self.conn.pipeline() as pipe:
            self.rq.cleanup_execution(r.job, pipeline=pipe, execution=r.execution)
            pipe.execute()
        log.info("%s: job %s cancelled while running", r.request.model, r.job.id)
        self._ended(r, "cancelled")

    def _ended(self, r: _Running, status: str) -> None:
        self.conn.zrem(keys.user_jobs(r.request.user), r.job.id)
        if r.request.reply_to:
            self.replies.spublish(r.request.reply_to, messages.encode_batch([JobEvent(r.job.id, status)]))
