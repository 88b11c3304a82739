"""Redis I/O beside the compute loop: one thread each for claiming, publishing,
heartbeats (lease renewal, reaping) and cancellations, so the model's forward pass
never waits on the network and the network never waits on the model."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from broker import keys, messages
from broker.connection import UNAVAILABLE, Outage
from broker.messages import ErrorEvent, TokenEvent, encode_heartbeat
from gpu_worker.engine import Engine, Outgoing
from metrics.lifecycle import Claim, WorkerRecorder
from scheduler.queue import FairQueue

log = logging.getLogger(__name__)


class _Deferred:
    """Stands in for a pipeline while a batch is prepared: records the calls (the
    lifecycle recorder's XADDs) so that a batch retried after an outage replays the same
    commands without running the recorder's bookkeeping twice."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name):
        return lambda *a, **kw: self.calls.append((name, a, kw))

    def replay(self, pipe) -> None:
        for name, a, kw in self.calls:
            getattr(pipe, name)(*a, **kw)


@dataclass
class _Prepared:
    """One round trip's worth of commands, built once, sendable again."""

    index_ops: list[tuple[str, list]] = field(default_factory=list)
    deferred: _Deferred = field(default_factory=_Deferred)
    emits: dict[tuple[str, str], list[tuple[str, str, bytes]]] = field(default_factory=dict)
    """(model, reply channel) -> (request id, emit mode, encoded event), in order."""
    tokens: list[tuple[str, str, TokenEvent, bytes]] = field(default_factory=list)
    """(model, reply channel, event, encoded): remembered once shipped (``_reconcile``)."""
    done: list[tuple[str, str]] = field(default_factory=list)
    """(model, request id) whose leases are released after their events."""
    requeue: list[Outgoing] = field(default_factory=list)
    """Requests handed back to the queue (``Outgoing.requeue``) after their events."""
    size: int = 0


@dataclass
class _Shipped:
    """What was shipped for one request still in flight: enough to re-append it if a
    restarted Redis lost the last writes (AOF ``everysec`` keeps all but about a second)."""

    model: str
    channel: str
    events: list[tuple[TokenEvent, bytes]] = field(default_factory=list)


def _mode(o: Outgoing) -> str:
    """How ``lua/emit.lua`` treats an event: fenced by lease owner or not, logged or not."""
    if not o.owned:
        return "final"
    return "owned" if isinstance(o.event, (TokenEvent, ErrorEvent)) else "live"


class Publisher(threading.Thread):
    """Ships each step's events in one pipelined round trip: per API process one fenced
    emit (append to the output logs, publish the batch: ``lua/emit.lua``), then release
    finished requests' leases and hand requests back to the queue (preempted, or held
    by a failed step: ``lua/requeue.lua``); the lifecycle events of claims and releases
    (``metrics.lifecycle``) ride along in the same round trip, those of requests handed
    back in the next one (they depend on the queue's answer).

    While Redis is unreachable it keeps what the engines produce, in order (the compute
    loop pauses once ``max_buffered`` events wait: ``backlogged``), and ships it when
    Redis is back, after re-appending whatever a restarted Redis lost of what had been
    shipped already. An outage longer than ``give_up_s`` calls ``on_give_up`` (the
    clients' streams have ended by then) and drops the buffer."""

    MAX_ROUND_TRIP = 4096
    """Most outgoing items per round trip (a buffer flushed after an outage goes in slices)."""

    def __init__(self, client, fq: FairQueue, worker_id: str, on_lost, index_ttl_s: float = 5.0,
                 events_maxlen: int = 100_000, max_buffered: int = 50_000, give_up_s: float = 30.0,
                 on_give_up=None):
        super().__init__(name="publisher", daemon=True)
        self.r, self.fq, self.worker_id = client, fq, worker_id
        self.index_ttl_s = index_ttl_s
        self.recorder = WorkerRecorder(worker_id, events_maxlen)
        self.q: queue.Queue[list[Outgoing | Claim] | None] = queue.Queue()
        self._complete = fq._scripts["complete"]  # noqa: SLF001 - same script, pipelined
        self._on_lost = on_lost
        self._on_give_up = on_give_up
        self.max_buffered, self.give_up_s = max_buffered, give_up_s
        self.outage = Outage(f"worker {worker_id} publisher", log)
        self._pending: list[_Prepared] = []
        self._shipped: dict[str, _Shipped] = {}
        self._reconcile_due = False
        self._gave_up = False
        self.buffered = 0
        """Events prepared but not yet shipped (non-zero only while Redis is unreachable)."""
        self.published = 0
        self.round_trips = 0
        self.busy_s = 0.0

    @property
    def backlogged(self) -> bool:
        return self.buffered >= self.max_buffered

    def reconcile_soon(self) -> None:
        """Redis restarted (its run id changed): before the next round trip, check the
        logs of what is in flight for writes it lost. (A restart shorter than the
        client's own retries is noticed only this way.)"""
        self._reconcile_due = True

    def submit(self, batch: list[Outgoing | Claim]) -> None:
        self.q.put(batch)

    def stop(self) -> None:
        self.q.put(None)

    def ship_now(self, batch: list[Outgoing]) -> None:
        """Write a batch from the calling thread (the publisher thread has stopped): its
        round trip and whatever that asks to follow. Redis errors go to the caller."""
        prepared = self._prepare(batch) if batch else None
        while prepared is not None:
            prepared = self._send(prepared)

    def run(self) -> None:
        stopping = False
        pause = 0.0
        while True:
            try:  # block for work only when nothing waits to be retried
                items = [self.q.get(timeout=pause if self._pending else None)]
            except queue.Empty:
                items = []
            while True:  # coalesce whatever else is already waiting
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            batch: list[Outgoing | Claim] = []
            for item in items:
                if item is None:
                    stopping = True
                else:
                    batch.extend(item)
            while batch:
                part, batch = batch[:self.MAX_ROUND_TRIP], batch[self.MAX_ROUND_TRIP:]
                prepared = self._prepare(part)
                self._pending.append(prepared)
                self.buffered += prepared.size
            pause = self._flush()
            if stopping and (not self._pending or self.outage.down):
                if self._pending:
                    log.warning("dropping %d unshipped events: Redis unavailable at shutdown", self.buffered)
                return

    def _flush(self) -> float:
        """Ship what waits, oldest first; returns the pause before the next try."""
        try:
            if self._pending and self._reconcile_due:
                self._reconcile()
                self._reconcile_due = False
            while self._pending:
                follow_up = self._send(self._pending[0])
                self.buffered -= self._pending.pop(0).size
                if follow_up is not None:
                    self._pending.insert(0, follow_up)
            self.outage.ok()
            self._gave_up = False
            return 0.0
        except UNAVAILABLE as exc:
            # A round trip cut short may have run in part: replaying it appends some events
            # twice (readers drop repeats by offset); a restarted Redis may have lost some.
            self._reconcile_due = True
            pause = self.outage.failed(exc)
            if self.outage.elapsed() > self.give_up_s and not self._gave_up:
                self._gave_up = True  # once per outage: what is buffered after it (releases) waits
                log.error("Redis unavailable for %.0f s: dropping %d unshipped events and every request held",
                          self.outage.elapsed(), self.buffered)
                self._pending.clear()
                self.buffered = 0
                self._shipped.clear()
                self._reconcile_due = False
                if self._on_give_up is not None:
                    self._on_give_up()
            return pause
        except Exception:  # noqa: BLE001 - keep the worker alive; leases cover the loss
            log.exception("publish failed; dropping %d events", self._pending[0].size)
            self.buffered -= self._pending.pop(0).size
            return 0.0

    def _prepare(self, batch: list[Outgoing | Claim]) -> _Prepared:
        """Build a round trip (and do its bookkeeping) once; it may be sent more than once."""
        now = time.time()
        p = _Prepared(size=len(batch))
        for o in batch:  # the KV index first: a follow-up turn must find it once the answer is out
            if isinstance(o, Outgoing) and o.index_ops:
                p.index_ops.append((o.model, o.index_ops))
        for o in batch:
            if isinstance(o, Claim):
                self.recorder.claim(p.deferred, o)
                continue
            if o.requeue:  # its event (an error) goes out only if the queue says it failed
                p.requeue.append(o)
                continue
            if o.event is not None:
                encoded = messages.encode(o.event)
                p.emits.setdefault((o.model, o.reply_to), []).append((o.request_id, _mode(o), encoded))
                if isinstance(o.event, TokenEvent):
                    self.recorder.token(o.model, o.event, now)
                    p.tokens.append((o.model, o.reply_to, o.event, encoded))
            if o.request_done:
                p.done.append((o.model, o.request_id))
                self.recorder.release(p.deferred, o.model, o.request_id, o.event, now)
        return p

    def _send(self, p: _Prepared) -> _Prepared | None:
        """One round trip; returns what must follow it (the requeues' consequences)."""
        started = time.perf_counter()
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for model, ops in p.index_ops:
            self.fq.kv_index(model, self.worker_id, ops, self.index_ttl_s, client=pipe)
        emitted = []
        for (model, channel), events in p.emits.items():
            emitted.append((model, len(pipe)))
            self.fq.emit(model, self.worker_id, channel, events, client=pipe)
        for model, rid in p.done:
            self._complete(args=[keys.tag(model), self.worker_id, rid, self.fq.s.output_log_ttl_s], client=pipe)
        requeued_at = len(pipe)  # after their last tokens
        for o in p.requeue:
            self.fq.requeue(o.model, self.worker_id, o.request_id, o.requeue, client=pipe, now=now)
        p.deferred.replay(pipe)
        results = pipe.execute()
        for model, rid_list in ((m, results[i]) for m, i in emitted):
            if rid_list:
                for rid in rid_list:
                    self._shipped.pop(rid, None)
                self._on_lost(model, list(rid_list))
        for model, channel, ev, encoded in p.tokens:
            self._shipped.setdefault(ev.request_id, _Shipped(model, channel)).events.append((ev, encoded))
        for _, rid in p.done:
            self._shipped.pop(rid, None)
        self.published += p.size
        self.round_trips += 1
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        self.recorder.round_trip(now, now + elapsed)
        if p.requeue:
            return self._after_requeue(p.requeue, results[requeued_at:requeued_at + len(p.requeue)])
        return None

    def _after_requeue(self, handed_back: list[Outgoing], answers: list[str]) -> _Prepared:
        """What follows the requeue answers (``lua/requeue.lua``), as a round trip of its
        own that waits out an outage like any other: the error of a request out of
        attempts (logged, so a resuming client sees it too) and the lifecycle events."""
        now = time.time()
        p = _Prepared()
        for o, answer in zip(handed_back, answers):
            self._shipped.pop(o.request_id, None)  # not this worker's any more
            if answer == "failed":  # out of attempts: the client gets the error now
                p.emits.setdefault((o.model, o.reply_to), []).append(
                    (o.request_id, "final", messages.encode(o.event)))
                self.recorder.release(p.deferred, o.model, o.request_id, o.event, now)
            elif answer == "requeued":
                self.recorder.requeued(p.deferred, o.model, o.request_id, o.requeue, o.reason, now)
            else:  # cancelled meanwhile, or no longer ours
                self.recorder.release(p.deferred, o.model, o.request_id, None, now)
        return p

    def _reconcile(self) -> None:
        """After an outage: re-append what a restarted Redis lost of the events already
        shipped for requests still in flight (an AOF synced every second loses the last
        writes before a crash), so the output logs have no gap before the buffered rest."""
        if not self._shipped:
            return
        rids = list(self._shipped)
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.lrange(keys.output_log(self._shipped[rid].model, rid), 0, -1)
        logs = pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        lost = 0
        for rid, raw in zip(rids, logs):
            shipped = self._shipped[rid]
            have: dict[int, int] = {}
            ended: set[int] = set()
            for x in raw:
                ev = messages.decode(x)
                if isinstance(ev, TokenEvent):
                    have[ev.choice] = max(have.get(ev.choice, 0), ev.start + len(ev.token_ids))
                    if ev.finish_reason:
                        ended.add(ev.choice)
            missing = [(rid, "owned", enc) for ev, enc in shipped.events
                       if ev.choice not in ended and ev.start >= have.get(ev.choice, 0)]
            if missing:
                lost += len(missing)
                self.fq.emit(shipped.model, self.worker_id, shipped.channel, missing, client=pipe)
        if lost:
            log.warning("re-appending %d events a restarted Redis lost", lost)
            pipe.execute()


class Claimer(threading.Thread):
    """Claims work whenever an engine has free capacity; sleeps on the models'
    doorbells (BLPOP) when the queues are empty, so idle workers cost nothing. While
    an engine is full it looks, once per step, for waiting requests that may preempt
    part of its batch (``FairQueue.claim_preempting``)."""

    def __init__(self, client, fq: FairQueue, worker_id: str, engines: dict[str, Engine],
                 wake: threading.Event, publisher: Publisher, stopping: threading.Event):
        super().__init__(name="claimer", daemon=True)
        self.r, self.fq, self.worker_id = client, fq, worker_id
        self.engines, self.wake, self.publisher, self.stopping = engines, wake, publisher, stopping
        self.capacity_freed = threading.Event()
        self.paused = threading.Event()
        self.claimed = 0
        self.outage = Outage(f"worker {worker_id} claimer", log)
        self._hold_until = 0.0
        self._looked: dict[str, int] = {}
        """Model -> the engine step at which it last looked for preempting requests."""

    def back_off(self, seconds: float) -> None:
        """Claim nothing for a while (this worker's step just failed: let healthy
        workers take the requests it handed back first)."""
        self._hold_until = time.monotonic() + seconds

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.paused.is_set() or self.publisher.backlogged or time.monotonic() < self._hold_until:
                time.sleep(0.05)  # (backlogged: Redis is away; claim nothing new meanwhile)
                continue
            try:
                got, had_room = self._claim_round()
                self.outage.ok()
                if got:
                    continue
                if had_room:
                    # Each ready model's doorbell, and this worker's own (rung for requests
                    # reserved for it). Models come and go (the model manager loads and
                    # evicts them), so the list is taken afresh each time.
                    bells = [b for m in self.engines for b in (keys.doorbell(m), keys.worker_doorbell(m, self.worker_id))]
                    self.r.blpop(bells, timeout=0.25)
                else:
                    self.capacity_freed.wait(0.05)
                    self.capacity_freed.clear()
            except UNAVAILABLE as exc:
                self.stopping.wait(self.outage.failed(exc))
            except Exception:  # noqa: BLE001 - nothing here may kill the worker
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
                        type="timeout", code="deadline_exceeded", status=503), owned=False)
                    for req in res.expired
                ])
            got += len(res.claimed)
            self.claimed += len(res.claimed)
        if got:
            self.wake.set()
        return got, had_room


class Heartbeat(threading.Thread):
    """Every period: advertise this worker (registering it again after Redis lost it),
    renew its leases (dropping requests it no longer owns), reap the requests of dead
    workers and lapsed leases of its models under a lock, forget dead workers."""

    def __init__(self, client, fq: FairQueue, worker_id: str, engines: dict[str, Engine], info, period_s: float,
                 ttl_s: float, publisher: Publisher, stopping: threading.Event):
        super().__init__(name="heartbeat", daemon=True)
        self.r, self.fq, self.worker_id, self.engines = client, fq, worker_id, engines
        self.info, self.period_s, self.ttl_s = info, period_s, ttl_s
        self.publisher, self.stopping = publisher, stopping
        self.outage = Outage(f"worker {worker_id} heartbeat", log)
        self.connected_since = time.monotonic()
        """Since when this worker's beats have gone through without a break."""
        self.redis_run_id: str | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
                if self.outage.ok() is not None:
                    self.connected_since = time.monotonic()
            except UNAVAILABLE as exc:
                self.outage.failed(exc)
            except Exception:  # noqa: BLE001
                log.exception("heartbeat failed")
            self.stopping.wait(self.period_s)

    def may_reap(self) -> bool:
        """Only after beating without a break for ``worker_dead_s``: when Redis comes back
        from an outage every worker looks long silent, and the live ones need a beat or
        two to say so before anyone takes their requests away."""
        return not self.outage.down and time.monotonic() - self.connected_since >= self.fq.s.worker_dead_s

    def beat(self) -> None:
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(keys.worker(self.worker_id), mapping=encode_heartbeat(self.info()))
        pipe.pexpire(keys.worker(self.worker_id), int(self.ttl_s * 1000))
        pipe.zadd(keys.WORKERS, {self.worker_id: now})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now - self.ttl_s)
        pipe.info("server")
        run_id = pipe.execute()[-1].get("run_id")
        if run_id != self.redis_run_id:
            if self.redis_run_id is not None:
                log.warning("Redis restarted (run id %s -> %s); checking the output logs of what is in flight",
                            self.redis_run_id, run_id)
                self.publisher.reconcile_soon()
                self.connected_since = time.monotonic()  # the others need a beat or two too
            self.redis_run_id = run_id
        for model, engine in self.engines.items():
            for rid in self.fq.extend_leases(model, self.worker_id, engine.request_ids()):
                engine.abort(rid)
            refresh = getattr(engine, "index_refresh_ops", None)
            if refresh:
                self.fq.kv_index(model, self.worker_id, refresh(), self.ttl_s)
            if self.may_reap() and self.r.set(keys.reaper_lock(model), self.worker_id, nx=True,
                                              px=int(self.period_s * 1000)):
                requeued, failed = self.fq.reap(model)
                if requeued:
                    log.warning("requeued %d requests of %s from dead workers or lapsed leases", len(requeued), model)
                if failed:
                    self.publisher.submit([
                        Outgoing(model, req.reply_to, req.id, ErrorEvent(
                            req.id, f"request failed on {self.fq.s.max_attempts} workers in a row",
                            type="server_error", code="worker_failed", status=500), owned=False)
                        for req in failed
                    ])


class CancelListener(threading.Thread):
    def __init__(self, client, engines: dict[str, Engine], stopping: threading.Event):
        super().__init__(name="cancels", daemon=True)
        self.r, self.engines, self.stopping = client, engines, stopping

    def run(self) -> None:
        outage = Outage("cancel listener", log)
        while not self.stopping.is_set():
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                outage.ok()
                while not self.stopping.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg["type"] == "message":
                        for engine in self.engines.values():
                            engine.abort(msg["data"])
            except UNAVAILABLE as exc:
                # Cancels announced meanwhile are not lost: the request's cancelled flag
                # makes the next lease renewal drop it.
                self.stopping.wait(outage.failed(exc))
            except Exception:  # noqa: BLE001
                log.exception("cancel listener failed; resubscribing")
                time.sleep(0.5)
            finally:
                pubsub.close()
