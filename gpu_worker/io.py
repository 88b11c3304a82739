"""Redis I/O beside the compute loop: one thread each for claiming, publishing,
heartbeats (lease renewal, reaping) and cancellations, so the model's forward pass
never waits on the network and the network never waits on the model."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

from broker import keys, messages
from broker.connection import UNAVAILABLE, next_message, refresh_topology
from broker.messages import ErrorEvent, TokenEvent, encode_heartbeat
from gpu_worker.engine import Engine, Outgoing
from metrics.lifecycle import Claim, WorkerRecorder
from scheduler import keys as qkeys
from scheduler.queue import FairQueue

log = logging.getLogger(__name__)


class _Recorded:
    """Stands in for a pipeline while a round trip is built: records the calls, so a
    round trip that failed (a failover) is sent again without doing its bookkeeping
    (metrics, spans) twice."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        return lambda *a, **kw: self.calls.append((name, a, kw))

    def replay(self, pipe) -> None:
        for name, a, kw in self.calls:
            getattr(pipe, name)(*a, **kw)


class Publisher(threading.Thread):
    """Ships each step's events in one pipelined round trip: append to each request's
    output log (for resume after a crash), then one SPUBLISH per API process and model
    (its reply channel is in the model's slot: on a Cluster the events go to the node
    that holds the log, after it), then release finished requests' leases; the
    lifecycle events of claims and releases (``metrics.lifecycle``) ride along in the
    same round trip. Requests handed back to the queue (preempted, or held by a failed
    step) follow in a second round trip, after their last tokens are in their logs.

    While Redis fails over (a replica taking over a primary's slots) a round trip is
    sent again until it goes through, for up to ``retry_s``: one cut short may have run
    in part, so some events may be appended twice, which readers drop by offset."""

    def __init__(self, client, fq: FairQueue, worker_id: str, on_error, index_ttl_s: float = 5.0,
                 events_maxlen: int = 100_000, retry_s: float = 30.0):
        super().__init__(name="publisher", daemon=True)
        self.r, self.fq, self.worker_id = client, fq, worker_id
        self.index_ttl_s, self.retry_s = index_ttl_s, retry_s
        self.recorder = WorkerRecorder(worker_id, events_maxlen)
        self.q: queue.Queue[list[Outgoing | Claim] | None] = queue.Queue()
        self._on_error = on_error
        self.published = 0
        self.round_trips = 0
        self.busy_s = 0.0

    def submit(self, batch: list[Outgoing | Claim]) -> None:
        self.q.put(batch)

    def stop(self) -> None:
        self.q.put(None)

    def run(self) -> None:
        while True:
            batch = self.q.get()
            if batch is None:
                return
            stop = False
            while True:  # coalesce whatever else is already waiting
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.extend(more)
            try:
                self._ship(batch)
            except Exception as exc:  # noqa: BLE001 - keep the worker alive; leases cover the loss
                log.exception("publish failed")
                self._on_error(exc)
            if stop:
                return

    def _ship(self, batch: list[Outgoing | Claim]) -> None:
        started = time.perf_counter()
        now = time.time()
        pipe = _Recorded()
        channels: dict[str, list] = defaultdict(list)
        done, requeue = [], []
        for o in batch:  # the KV index first: a follow-up turn must find it once the answer is out
            if isinstance(o, Outgoing) and o.index_ops:
                self.fq.kv_index(o.model, self.worker_id, o.index_ops, self.index_ttl_s, pipe=pipe)
        for o in batch:
            if isinstance(o, Claim):
                self.recorder.claim(pipe, o)
                continue
            if o.requeue:
                requeue.append(o)
                continue
            if isinstance(o.event, TokenEvent):
                self.recorder.token(o.model, o.event, now)
                self.fq.append_log(pipe, o.model, o.event.request_id, messages.encode(o.event))
            if o.event is not None:
                channels[o.reply_to].append(o.event)
            if o.request_done:
                done.append(o)
        for channel, events in channels.items():
            pipe.spublish(channel, messages.encode_batch(events))
        for o in done:
            self.fq.complete(o.model, self.worker_id, o.request_id, pipe=pipe)
            self.recorder.release(pipe, o.model, o.request_id, o.event, now)
        self._send(pipe)
        if requeue:
            self._requeue(requeue, now)
        self.published += len(batch)
        self.round_trips += 1
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        self.recorder.round_trip(now, now + elapsed)

    def _send(self, recorded: _Recorded) -> None:
        deadline, pause = time.monotonic() + self.retry_s, 0.05
        while True:
            pipe = self.r.pipeline(transaction=False)
            recorded.replay(pipe)
            try:
                pipe.execute()
                return
            except UNAVAILABLE:
                if time.monotonic() > deadline:
                    raise
                log.warning("publish failed (Redis unavailable); retrying in %.2f s", pause, exc_info=True)
                time.sleep(pause)
                pause = min(1.0, pause * 2)

    def _requeue(self, batch: list[Outgoing], now: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        for o in batch:
            self.fq.requeue(o.model, self.worker_id, o.request_id, o.requeue, pipe=pipe, now=now)
        answers = pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        for o, answer in zip(batch, answers):
            if answer == "failed":  # out of attempts: the client gets the error now
                pipe.spublish(o.reply_to, messages.encode_batch([o.event]))
                self.recorder.release(pipe, o.model, o.request_id, o.event, now)
            elif answer == "requeued":
                self.recorder.requeued(pipe, o.model, o.request_id, o.requeue, o.reason, now)
            else:  # cancelled meanwhile, or no longer ours
                self.recorder.release(pipe, o.model, o.request_id, None, now)
        pipe.execute()


class Doorbells:
    """Wakes an idle claimer when work for one of its models arrives.

    One thread per model blocks on that model's doorbells: a BLPOP of the model's bell
    and of this worker's own (rung for requests reserved for it), which share the
    model's slot, where one BLPOP over several models' bells would span slots (refused
    on a Redis Cluster). The threads take rings only while the claimer waits, so a
    busy worker leaves them to idle ones, and one ring wakes one claim round."""

    BLPOP_S = 0.25

    def __init__(self, fq: FairQueue, worker_id: str, stopping: threading.Event):
        self.fq, self.worker_id, self.stopping = fq, worker_id, stopping
        self._rang = threading.Event()
        self._listening = threading.Event()
        self._models: set[str] = set()
        self._threads: dict[str, threading.Thread] = {}

    def wait(self, models, timeout: float) -> bool:
        """Block until a doorbell of ``models`` rings (True) or ``timeout`` passes. A ring
        taken while the claimer was busy returns at once."""
        self._models = set(models)
        for model in self._models:
            if model not in self._threads or not self._threads[model].is_alive():
                self._threads[model] = threading.Thread(target=self._listen, args=(model,), daemon=True,
                                                        name=f"doorbell-{model}")
                self._threads[model].start()
        self._listening.set()
        try:
            return self._rang.wait(timeout)
        finally:
            self._listening.clear()
            self._rang.clear()

    def _listen(self, model: str) -> None:
        while model in self._models and not self.stopping.is_set():
            if not self._listening.wait(0.5):
                continue
            try:
                if self.fq.wait_for_work(model, self.worker_id, self.BLPOP_S):
                    self._rang.set()
            except Exception:  # noqa: BLE001 - Redis blips must not end the thread; the claimer polls too
                log.debug("doorbell wait for %s failed", model, exc_info=True)
                self.stopping.wait(0.5)


class Claimer(threading.Thread):
    """Claims work whenever an engine has free capacity; sleeps on the models'
    doorbells (``Doorbells``) when the queues are empty, so idle workers cost nothing.
    While an engine is full it looks, once per step, for waiting requests that may
    preempt part of its batch (``FairQueue.claim_preempting``)."""

    def __init__(self, client, fq: FairQueue, worker_id: str, engines: dict[str, Engine],
                 wake: threading.Event, publisher: Publisher, stopping: threading.Event):
        super().__init__(name="claimer", daemon=True)
        self.r, self.fq, self.worker_id = client, fq, worker_id
        self.engines, self.wake, self.publisher, self.stopping = engines, wake, publisher, stopping
        self.capacity_freed = threading.Event()
        self.paused = threading.Event()
        self.claimed = 0
        self.bells = Doorbells(fq, worker_id, stopping)
        self._hold_until = 0.0
        self._looked: dict[str, int] = {}
        """Model -> the engine step at which it last looked for preempting requests."""

    def back_off(self, seconds: float) -> None:
        """Claim nothing for a while (this worker's step just failed: let healthy
        workers take the requests it handed back first)."""
        self._hold_until = time.monotonic() + seconds

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.paused.is_set() or time.monotonic() < self._hold_until:
                time.sleep(0.05)
                continue
            try:
                got, had_room = self._claim_round()
                if got:
                    continue
                if had_room:
                    # Models come and go (the model manager loads and evicts them), so the
                    # list is taken afresh each time.
                    self.bells.wait(list(self.engines), timeout=0.25)
                else:
                    self.capacity_freed.wait(0.05)
                    self.capacity_freed.clear()
            except Exception:  # noqa: BLE001 - Redis blips must not kill the worker
                log.exception("claim failed; retrying")
                time.sleep(0.5)

    def _claim_round(self) -> tuple[int, bool]:
        got, had_room = 0, False
        for model, engine in self.engines.items():
            n = engine.capacity()
            if n > 0:
                had_room = True
                res = self.fq.claim_batch(model, self.worker_id, n)
            elif self.fq.s.preemption and hasattr(engine, "batch_view") and self._looked.get(model) != engine.steps:
                self._looked[model] = engine.steps  # one look per step: the batch changes no faster
                batch = engine.batch_view()
                if not any(r.steps >= self.fq.s.preempt_min_run_steps for r in batch.running):
                    continue
                res = self.fq.claim_preempting(model, self.worker_id, batch)
            else:
                continue
            if res.claimed:  # noted before the engine sees them, so before any of their tokens
                held, now = len(engine.request_ids()) + len(res.claimed), time.time()
                self.publisher.submit([Claim(model, c, held, now) for c in res.claimed])
            for c in res.claimed:
                log_events = self.fq.output_log(model, c.request.id) if c.attempt > 1 else []
                engine.add(c, log_events)
            if res.expired:
                self.publisher.submit([
                    Outgoing(model, req.reply_to, req.id, ErrorEvent(
                        req.id, "request deadline passed before it could start; retry later",
                        type="timeout", code="deadline_exceeded", status=503))
                    for req in res.expired
                ])
            got += len(res.claimed)
            self.claimed += len(res.claimed)
        if got:
            self.wake.set()
        return got, had_room


class Heartbeat(threading.Thread):
    """Every period: advertise this worker, renew its leases (dropping requests it no
    longer owns), reap lapsed leases of its models under a lock, forget dead workers."""

    def __init__(self, client, fq: FairQueue, worker_id: str, engines: dict[str, Engine], info, period_s: float,
                 ttl_s: float, publisher: Publisher, stopping: threading.Event):
        super().__init__(name="heartbeat", daemon=True)
        self.r, self.fq, self.worker_id, self.engines = client, fq, worker_id, engines
        self.info, self.period_s, self.ttl_s = info, period_s, ttl_s
        self.publisher, self.stopping = publisher, stopping

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")
            self.stopping.wait(self.period_s)

    def beat(self) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.worker(self.worker_id), mapping=encode_heartbeat(self.info()))
        pipe.pexpire(keys.worker(self.worker_id), int(self.ttl_s * 1000))
        pipe.zadd(keys.WORKERS, {self.worker_id: now})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - self.ttl_s)
        pipe.execute()
        for model, engine in self.engines.items():
            for rid in self.fq.extend_leases(model, self.worker_id, engine.request_ids()):
                engine.abort(rid)
            refresh = getattr(engine, "index_refresh_ops", None)
            if refresh:
                self.fq.kv_index(model, self.worker_id, refresh(), self.ttl_s)
            if self.fq.reap_lock(model, self.worker_id, self.period_s):
                requeued, failed = self.fq.reap(model)
                if requeued:
                    log.warning("requeued %d requests of %s from lapsed leases", len(requeued), model)
                if failed:
                    self.publisher.submit([
                        Outgoing(model, req.reply_to, req.id, ErrorEvent(
                            req.id, f"request failed on {self.fq.s.max_attempts} workers in a row",
                            type="server_error", code="worker_failed", status=500))
                        for req in failed
                    ])


class CancelListener(threading.Thread):
    """Drops cancelled requests at the next step: subscribed (sharded) to the cancel
    channel of each model this worker holds, which ``lua/cancel.lua`` announces on."""

    def __init__(self, client, engines: dict[str, Engine], stopping: threading.Event):
        super().__init__(name="cancels", daemon=True)
        self.r, self.engines, self.stopping = client, engines, stopping

    def run(self) -> None:
        while not self.stopping.is_set():
            pubsub = self.r.pubsub()
            subscribed: set[str] = set()
            try:
                while not self.stopping.is_set():
                    wanted = {qkeys.cancel_channel(m) for m in list(self.engines)}
                    if wanted - subscribed:
                        pubsub.ssubscribe(*(wanted - subscribed))
                    if subscribed - wanted:
                        pubsub.sunsubscribe(*(subscribed - wanted))
                    subscribed = wanted
                    if not subscribed:
                        self.stopping.wait(0.5)
                        continue
                    msg = next_message(pubsub, timeout=0.5)
                    if msg and msg["type"] == "smessage":
                        for engine in self.engines.values():
                            engine.abort(msg["data"])
            except Exception:  # noqa: BLE001 - lease renewals drop cancelled requests meanwhile
                log.exception("cancel listener lost its connection; resubscribing")
                time.sleep(0.5)
                try:
                    refresh_topology(self.r)
                except Exception:  # noqa: BLE001 - still failing over; next round
                    pass
            finally:
                pubsub.close()
