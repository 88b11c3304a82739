"""Redis outages through the real API and worker (tiny model): a stream rides out a
Redis restart (append-only file) and ends identical to an undisturbed one; new
requests meanwhile get 503 with Retry-After; when Redis comes back without the
request, or stays away past the limit, the stream ends with an error event and
[DONE], never silently. A worker re-appends what a restarted Redis lost."""

import threading
import time

import httpx
import pytest

from broker import keys, messages
from broker.connection import sync_client
from broker.messages import GenerateRequest, SamplingParams, TokenEvent
from gpu_worker.engine import Outgoing, handed_back
from gpu_worker.io import Heartbeat, Publisher
from inferstack.redis_server import RedisServer
from scheduler.queue import FairQueue
from scheduler.settings import SchedulerSettings
from tests.sse import errors, stream, texts
from tests.stack import Stack

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}], "ignore_eos": True,
        "temperature": 0, "stream": True, "user": "alice"}


def make_stack(server, tiny_registry, tmp_path, **settings) -> Stack:
    sched = SchedulerSettings(redis_url=server.url, lease_s=3)
    stack = Stack(server.url, tiny_registry, tmp_path / "cache", sched=sched, workers=0, api_kw=settings,
                  worker_kw=settings)
    stack.workers.append(stack.add_worker(step_delay_s=0.03))
    stack.wait_ready()
    return stack


class Background:
    """A streaming request read in a thread."""

    def __init__(self, url: str, body: dict):
        self.events: list = []
        self.thread = threading.Thread(target=lambda: self.events.extend(
            stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120)))
        self.started = time.monotonic()
        self.thread.start()

    def join(self):
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.events


def outcome(url: str, request_id: str) -> list[tuple[str, str]]:
    """The API's terminal lifecycle events of a request (what its row will say), once written."""
    client = sync_client(url)
    try:
        deadline = time.monotonic() + 20
        while True:
            ends = [(f["kind"], f.get("error", "")) for _, f in client.xrange(keys.EVENTS)
                    if f["request_id"] == request_id and f["kind"] in ("finished", "failed", "cancelled")]
            if ends or time.monotonic() > deadline:
                return ends
            time.sleep(0.05)
    finally:
        client.close()


def wait_tokens(engine, n: int):
    deadline = time.monotonic() + 30
    while engine.tokens_generated < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_stream_rides_out_a_redis_restart(tiny_registry, tmp_path):
    server = RedisServer(appendonly=True)
    stack = make_stack(server, tiny_registry, tmp_path)
    engine = stack.workers[0].engines["tiny"]
    try:
        reference = stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 80})
        before = engine.tokens_generated
        run = Background(stack.url, {**CHAT, "max_tokens": 80})
        wait_tokens(engine, before + 10)
        server.shutdown()  # AOF synced; back in a moment
        down_at = engine.tokens_generated
        refused = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 4},
                             timeout=30)
        time.sleep(1.5)
        generated_while_down = engine.tokens_generated - down_at
        server.start()
        events = run.join()
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "redis_unavailable"
        assert int(refused.headers["Retry-After"]) >= 1
        assert not errors(events) and events[-1].data == "[DONE]"
        assert [e.id for e in events] == [e.id for e in reference]
        assert texts(events) == texts(reference)
        assert generated_while_down > 0  # the worker kept generating into its buffer
        assert outcome(server.url, events[0].json["id"]) == [("finished", "")]  # its row: finished, once
        after = httpx.post(f"{stack.url}/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 4},
                           timeout=30)
        assert after.status_code == 200
    finally:
        stack.stop()
        server.stop()


def test_redis_back_without_the_request_ends_the_stream_with_an_error(tiny_registry, tmp_path):
    server = RedisServer(appendonly=False)  # a restart loses everything
    stack = make_stack(server, tiny_registry, tmp_path)
    engine = stack.workers[0].engines["tiny"]
    try:
        run = Background(stack.url, {**CHAT, "max_tokens": 200})
        wait_tokens(engine, 10)
        server.restart(down_s=0.5)
        events = run.join()
        assert [e["code"] for e in errors(events)] == ["request_lost"] and events[-1].data == "[DONE]"
        assert outcome(server.url, events[0].json["id"]) == [("failed", "request_lost")]  # not "finished"
        deadline = time.monotonic() + 30
        while engine.request_ids():  # the worker learns it lost the request and stops it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stack.wait_ready()  # the worker registered again
        again = stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 5})
        assert not errors(again) and again[-1].data == "[DONE]"
    finally:
        stack.stop()
        server.stop()


def test_an_outage_past_the_limit_ends_the_stream_with_an_error(tiny_registry, tmp_path):
    server = RedisServer(appendonly=True)
    stack = make_stack(server, tiny_registry, tmp_path, redis_outage_s=1.0)
    engine = stack.workers[0].engines["tiny"]
    try:
        run = Background(stack.url, {**CHAT, "max_tokens": 300})
        wait_tokens(engine, 10)
        server.shutdown()
        events = run.join()  # ends while Redis is still away
        server.start()
        assert [e["code"] for e in errors(events)] == ["redis_unavailable"] and events[-1].data == "[DONE]"
        assert outcome(server.url, events[0].json["id"]) == [("failed", "redis_unavailable")]
        stack.wait_ready()
        again = stream("POST", f"{stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 5})
        assert not errors(again)
    finally:
        stack.stop()
        server.stop()


def test_a_worker_re_appends_what_a_restarted_redis_lost(redis_url, rclient):
    """A crash with ``appendfsync everysec`` can lose the last second of writes, which
    the client may have seen live. The heartbeat notices the restart (new run id), and
    the publisher puts the lost events back before anything newer."""
    fq = FairQueue(sync_client(redis_url), SchedulerSettings())
    req = GenerateRequest(id="r1", model="m", prompt_token_ids=[1, 2], params=SamplingParams(max_tokens=10),
                          reply_to="is:reply:t")
    fq.enqueue(req)
    fq.claim_batch("m", "w", 1)
    publisher = Publisher(sync_client(redis_url), fq, "w", on_lost=lambda *_: None)
    heartbeat = Heartbeat(sync_client(redis_url), fq, "w", {}, lambda: {"id": "w"}, 0.5, 5.0, publisher,
                          threading.Event())
    publisher.start()
    log = keys.output_log("m", "r1")

    def tokens(lo, hi):
        publisher.submit([Outgoing("m", "is:reply:t", "r1", TokenEvent("r1", 0, i, [100 + i], f"t{i}"))
                          for i in range(lo, hi)])
        deadline = time.monotonic() + 10
        while not [x for x in rclient.lrange(log, 0, -1) if f'"start":{hi - 1},' in x]:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    try:
        tokens(0, 6)
        rclient.ltrim(log, 0, 2)  # "lost": the events of tokens 3..5 ...
        heartbeat.redis_run_id = "before-the-crash"  # ... in a crash the heartbeat now notices
        heartbeat.beat()
        tokens(6, 8)
        starts = sorted(messages.decode(x).start for x in rclient.lrange(log, 0, -1))
        assert starts == list(range(8))
    finally:
        publisher.stop()
        publisher.join(5)
        for client in (fq.r, publisher.r, heartbeat.r):
            client.close()


class TwoClaimed:
    """An append-only redis-server the test stops and starts, requests r1 and r2 of
    model m claimed by worker w, and that worker's publisher."""

    def __init__(self, **publisher_kw):
        self.server = RedisServer(appendonly=True)
        self.r = sync_client(self.server.url)
        self.fq = FairQueue(sync_client(self.server.url), SchedulerSettings())
        self.reqs = {rid: GenerateRequest(id=rid, model="m", prompt_token_ids=[1], params=SamplingParams(max_tokens=10),
                                          reply_to="is:reply:t") for rid in ("r1", "r2")}
        for req in self.reqs.values():
            self.fq.enqueue(req)
        self.fq.claim_batch("m", "w", 2)
        self.publisher = Publisher(sync_client(self.server.url), self.fq, "w", on_lost=lambda *_: None, **publisher_kw)
        self.publisher.start()

    @staticmethod
    def tokens(rid: str, lo: int, hi: int) -> list[Outgoing]:
        return [Outgoing("m", "is:reply:t", rid, TokenEvent(rid, 0, i, [100 + i], f"t{i}")) for i in range(lo, hi)]

    def log(self, rid: str) -> list:
        return [messages.decode(x) for x in self.r.lrange(keys.output_log("m", rid), 0, -1)]

    def wait(self, cond) -> None:
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def close(self) -> None:
        self.publisher.stop()
        self.publisher.join(5)
        for client in (self.r, self.fq.r, self.publisher.r):
            client.close()
        self.server.stop()


def test_a_worker_buffers_in_order_while_redis_is_away_and_gives_up_past_the_limit():
    gave_up = threading.Event()
    t = TwoClaimed(max_buffered=4, give_up_s=60, on_give_up=gave_up.set)
    publisher = t.publisher

    def starts(rid):
        return [ev.start for ev in t.log(rid)]

    try:
        t.server.shutdown()
        for i in range(5):
            publisher.submit(t.tokens("r1", i, i + 1))
        t.wait(lambda: publisher.backlogged)  # the compute loop would pause here
        t.server.start()
        t.wait(lambda: not publisher.buffered)
        assert starts("r1") == [0, 1, 2, 3, 4] and not gave_up.is_set()

        publisher.give_up_s = 0.5
        t.server.shutdown()
        publisher.submit(t.tokens("r2", 0, 1))
        assert gave_up.wait(10)  # the outage outlasted the limit: the worker drops what it holds
        publisher.submit(t.tokens("r2", 1, 2))  # (say, the release of what it dropped) waits for Redis
        t.server.start()
        t.wait(lambda: not publisher.buffered)
        assert starts("r2") == [1]
    finally:
        t.close()


def test_requests_handed_back_while_redis_is_away_go_back_after_their_tokens():
    """A preemption and a failed step's hand-back (issue 11) during an outage wait in
    the buffer like any output: once Redis is back, each request's tokens are logged
    first, then it is requeued with its log (a resume continues from there), or, out of
    attempts, ends with its error in the log too (a resuming client sees it)."""
    t = TwoClaimed()
    t.r.hset(keys.request("m", "r2"), "attempts", t.fq.s.max_attempts)  # its last attempt
    try:
        t.server.shutdown()
        t.publisher.submit(t.tokens("r1", 0, 3) + t.tokens("r2", 0, 3))
        t.publisher.submit([Outgoing("m", "is:reply:t", "r1", None, requeue="preempted", reason="tier"),
                            *handed_back("m", [t.reqs["r2"]], "RuntimeError: out of memory")])
        time.sleep(0.3)
        t.server.start()
        t.wait(lambda: {"preempted", "released"} <= {f["kind"] for _, f in t.r.xrange(keys.EVENTS)})
        r1 = t.r.hgetall(keys.request("m", "r1"))
        assert (r1["state"], r1["preemptions"]) == ("queued", "1") and "worker" not in r1
        assert [ev.start for ev in t.log("r1")] == [0, 1, 2]
        assert t.fq.claim_batch("m", "w2", 1).claimed[0].request.id == "r1"  # next in line
        *tokens, error = t.log("r2")
        assert [ev.start for ev in tokens] == [0, 1, 2] and error.code == "engine_error"
        assert not t.r.exists(keys.request("m", "r2"))
        [released] = [f for _, f in t.r.xrange(keys.EVENTS) if f["kind"] == "released"]
        assert (released["request_id"], released["error"]) == ("r2", "engine_error")
    finally:
        t.close()


def test_a_stopping_worker_hands_back_from_its_own_thread():
    """``Worker.hand_back`` runs after the publisher thread has stopped: ``ship_now``
    writes the last tokens, then requeues the request as ``drained`` (not a failed
    attempt) with its log, so the next worker resumes it at once instead of after the lease."""
    t = TwoClaimed()
    try:
        t.publisher.stop()
        t.publisher.join(5)
        t.publisher.ship_now(t.tokens("r1", 0, 2) + [Outgoing("m", "is:reply:t", "r1", None, requeue="drained")])
        r1 = t.r.hgetall(keys.request("m", "r1"))
        assert r1["state"] == "queued" and "worker" not in r1 and r1["attempts"] == "1"
        assert [ev.start for ev in t.log("r1")] == [0, 1]
        assert t.fq.claim_batch("m", "w2", 1).claimed[0].request.id == "r1"
    finally:
        t.close()
