"""Resumable streams through the real API and worker (tiny model, real redis-server):
every event has an id; a client that hangs up resumes with Last-Event-ID and gets
exactly the rest; only the owner may; a stream nobody resumes is cancelled after the
grace period."""

import threading

import httpx
import pytest

from api.settings import ApiSettings
from broker import keys
from inferstack.redis_server import free_port
from metrics.events import Kind
from tests.sse import errors, stream, texts
from tests.stack import ApiThread, Stack

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}], "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "user": "alice"}


@pytest.fixture
def slow_stack(redis_url, tiny_registry, tmp_path):
    stack = Stack(redis_url, tiny_registry, tmp_path / "cache", workers=0, api_kw={"stream_grace_s": 30})
    stack.workers.append(stack.add_worker(step_delay_s=0.02))
    stack.wait_ready()
    yield stack
    stack.stop()


def ids(events):
    return [e.id for e in events]


def test_a_dropped_stream_resumes_with_exactly_the_rest(slow_stack):
    url = f"{slow_stack.url}/v1/chat/completions"
    reference = stream("POST", url, json={**CHAT, "max_tokens": 30})
    assert ids(reference) == [str(i) for i in range(1, 31)] + ["usage", "done"]  # one token per event here

    head = stream("POST", url, json={**CHAT, "max_tokens": 30}, limit=6)
    rid = head[0].json["id"]
    rest = stream("GET", f"{url}/{rid}/stream", params={"user": "alice"}, headers={"Last-Event-ID": head[-1].id})
    joined = head + rest
    assert ids(joined) == ids(reference)  # no duplicate, no gap
    assert joined[-1].data == "[DONE]" and rest[0].json["choices"][0]["delta"].get("role") is None
    assert texts(joined) == texts(reference)
    assert joined[-2].json["usage"] == reference[-2].json["usage"]

    # the whole stream again, from the start, once it has ended; `?after=` works too
    again = stream("GET", f"{url}/{rid}/stream", params={"user": "alice"})
    assert ids(again) == ids(reference) and texts(again) == texts(reference)
    tail = stream("GET", f"{url}/{rid}/stream", params={"user": "alice", "after": "usage"})
    assert [e.data for e in tail] == ["[DONE]"]


def test_only_the_owner_resumes_and_bad_ids_are_refused(slow_stack):
    url = f"{slow_stack.url}/v1/chat/completions"
    done = stream("POST", url, json={**CHAT, "max_tokens": 4})
    rid = done[0].json["id"]
    other = httpx.get(f"{url}/{rid}/stream", params={"user": "mallory"}, timeout=10)
    assert other.status_code == 404 and other.json()["error"]["code"] == "stream_not_found"
    assert httpx.get(f"{url}/chatcmpl-nope/stream", params={"user": "alice"}, timeout=10).status_code == 404
    wrong_kind = httpx.get(f"{slow_stack.url}/v1/completions/{rid}/stream", params={"user": "alice"}, timeout=10)
    assert wrong_kind.status_code == 404
    bad = httpx.get(f"{url}/{rid}/stream", params={"user": "alice"}, headers={"Last-Event-ID": "1.2"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_event_id"


def test_multi_prompt_completion_with_n_resumes_per_choice(slow_stack):
    url = f"{slow_stack.url}/v1/completions"
    body = {"model": "tiny", "prompt": ["Hello", "Goodbye"], "n": 2, "max_tokens": 12, "ignore_eos": True,
            "temperature": 0, "stream": True, "user": "alice", "echo": True}
    reference = stream("POST", url, json=body)
    head = stream("POST", url, json=body, limit=9)
    rest = stream("GET", f"{url}/{head[0].json['id']}/stream", params={"user": "alice"},
                  headers={"Last-Event-ID": head[-1].id})
    joined = head + rest
    assert texts(joined) == texts(reference) and len(texts(reference)) == 4
    # Choices interleave as they come; each event moves its own choice on, never back.
    vectors = [[int(x) for x in i.split(".")] for i in ids(joined)[:-1]]
    assert all(a != b and all(x <= y for x, y in zip(a, b)) for a, b in zip(vectors, vectors[1:])), str(vectors)
    assert len(vectors) == len(reference) - 1 and vectors[-1] == [12, 12, 12, 12]


def test_resume_on_another_api_process_follows_the_log(slow_stack, redis_url, tiny_registry, tmp_path):
    other = ApiThread(ApiSettings(redis_url=redis_url, models_file=tiny_registry, cache_dir=tmp_path / "cache",
                                  port=free_port()), slow_stack.sched)
    try:
        url = f"{slow_stack.url}/v1/chat/completions"
        reference = stream("POST", url, json={**CHAT, "max_tokens": 40})
        head = stream("POST", url, json={**CHAT, "max_tokens": 40}, limit=3)
        rest = stream("GET", f"{other.url}/v1/chat/completions/{head[0].json['id']}/stream",
                      params={"user": "alice"}, headers={"Last-Event-ID": head[-1].id})
        assert ids(head + rest) == ids(reference) and texts(head + rest) == texts(reference)
    finally:
        other.stop()


def test_a_stream_nobody_resumes_is_cancelled_after_the_grace_period(redis_url, tiny_registry, tmp_path, rclient):
    stack = Stack(redis_url, tiny_registry, tmp_path / "cache", workers=0, api_kw={"stream_grace_s": 1.0})
    stack.workers.append(stack.add_worker(step_delay_s=0.02))
    stack.wait_ready()
    engine = stack.workers[0].engines["tiny"]
    try:
        url = f"{stack.url}/v1/chat/completions"
        head = stream("POST", url, json={**CHAT, "max_tokens": 400}, limit=3)
        rid = head[0].json["id"]
        generating = threading.Event()
        # still generating after the hang-up (resumable) ...
        for _ in range(200):
            if engine.request_ids() and engine.tokens_generated > 10:
                generating.set()
                break
            threading.Event().wait(0.01)
        assert generating.is_set()
        # ... then dropped once nobody came back
        for _ in range(1000):
            if not engine.request_ids():
                break
            threading.Event().wait(0.02)
        assert not engine.request_ids() and engine.tokens_generated < 400
        gone = httpx.get(f"{url}/{rid}/stream", params={"user": "alice"}, timeout=10)
        assert gone.status_code == 404
        kinds = [f["kind"] for _, f in rclient.xrange(keys.EVENTS) if f["request_id"] == rid]
        assert Kind.CANCELLED in kinds and Kind.FINISHED not in kinds
    finally:
        stack.stop()


def test_a_resumed_stream_that_finishes_records_one_finished_request(slow_stack, rclient):
    url = f"{slow_stack.url}/v1/chat/completions"
    head = stream("POST", url, json={**CHAT, "max_tokens": 20}, limit=2)
    rid = head[0].json["id"]
    rest = stream("GET", f"{url}/{rid}/stream", params={"user": "alice"}, headers={"Last-Event-ID": head[-1].id})
    assert not errors(rest)
    kinds = [f["kind"] for _, f in rclient.xrange(keys.EVENTS) if f["request_id"] == rid]
    assert kinds.count(Kind.FINISHED) == 1 and Kind.CANCELLED not in kinds
    finished = [f for _, f in rclient.xrange(keys.EVENTS) if f["request_id"] == rid and f["kind"] == Kind.FINISHED]
    assert finished[0]["completion_tokens"] == "20"
