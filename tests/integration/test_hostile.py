"""Hostile input against the real API and a real redis-server (tiny model): every case
gets an OpenAI-shaped 4xx or its documented behaviour, never a 5xx; a rejected request
enqueues nothing; other tenants' streams and /health are unaffected. The SmolLM2
version of the tenant checks is tests/e2e/test_hostile.py; the schema-driven fuzz
pass is tests/integration/test_fuzz.py."""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from api.auth import hash_key
from broker import keys
from tests.stack import Stack
from tests.tiny import registry_toml

LIMITS = dict(max_body_bytes=256 * 1024, max_messages=16, max_prompt_chars=20_000, max_prompts=4,
              max_stop_token_ids=8, max_logit_bias=8, max_images=2)
MSG = [{"role": "user", "content": "Hello world"}]
CHAT = {"model": "tiny", "messages": MSG, "max_tokens": 4}
COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def queued(rclient, model="tiny") -> int:
    return int(rclient.hget(keys.tier_state(model), "len") or 0)


@pytest.fixture(scope="module")
def idle(redis_server, tmp_path_factory, tiny_model_dir):
    """API only, no worker: anything admitted would stay queued, so 'nothing enqueued'
    is plain to see."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("hostile")
    s = Stack(redis_server.url, registry_toml(tmp / "models.toml", tiny_model_dir), tmp / "cache", workers=0,
              api_kw=LIMITS)
    yield s
    s.stop()


BIG_INT = "1" + "0" * 5000
DEEP = "[" * 100_000 + "]" * 100_000

# (case, endpoint, body: dict or raw str, status, code)
REJECTED = [
    ("invalid JSON", "chat", '{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("empty body", "chat", "", 400, "invalid_json"),
    ("array body", "chat", "[1, 2]", 400, None),
    ("string messages", "chat", {**CHAT, "messages": "hi"}, 400, None),
    ("NaN temperature", "chat", json.dumps(CHAT)[:-1] + ', "temperature": NaN}', 400, None),
    ("Infinity deadline", "chat", json.dumps(CHAT)[:-1] + ', "deadline_s": Infinity}', 400, None),
    ("1e400 penalty", "chat", json.dumps(CHAT)[:-1] + ', "presence_penalty": 1e400}', 400, None),
    ("deadline beyond the default", "chat", {**CHAT, "deadline_s": 1e9}, 400, "invalid_value"),
    ("zero deadline", "chat", {**CHAT, "deadline_s": 0}, 400, None),
    ("seed 2^64", "chat", {**CHAT, "seed": 2**64}, 400, None),
    ("seed below int64", "chat", {**CHAT, "seed": -(2**63) - 1}, 400, None),
    ("seed of 5000 digits", "chat", json.dumps(CHAT)[:-1] + f', "seed": {BIG_INT}}}', 400, None),
    ("top_k 2^64", "chat", {**CHAT, "top_k": 2**64}, 400, None),
    ("max_tokens 2^64", "chat", {**CHAT, "max_tokens": 2**64}, 400, None),
    ("n 2^64", "chat", {**CHAT, "n": 2**64}, 400, None),
    ("n above INFERSTACK_MAX_N", "chat", {**CHAT, "n": 9}, 400, "invalid_value"),
    ("five stop sequences", "chat", {**CHAT, "stop": list("abcde")}, 400, "limit_exceeded"),
    ("a 300-character stop", "chat", {**CHAT, "stop": "x" * 300}, 400, "limit_exceeded"),
    ("too many stop_token_ids", "chat", {**CHAT, "stop_token_ids": list(range(9))}, 400, "limit_exceeded"),
    ("100k stop_token_ids", "chat", {**CHAT, "stop_token_ids": [1] * 100_000}, 400, "limit_exceeded"),
    ("stop_token_id beyond the vocabulary", "chat", {**CHAT, "stop_token_ids": [10**6]}, 400, "invalid_value"),
    ("stop_token_id 2^64", "chat", {**CHAT, "stop_token_ids": [2**64]}, 400, None),
    ("too many logit_bias", "chat", {**CHAT, "logit_bias": {str(i): 1 for i in range(9)}}, 400, "limit_exceeded"),
    ("logit_bias word key", "chat", {**CHAT, "logit_bias": {"hello": 1}}, 400, "invalid_value"),
    ("logit_bias huge key", "chat", {**CHAT, "logit_bias": {"9" * 5000: 1}}, 400, "invalid_value"),
    ("logit_bias 1000", "chat", {**CHAT, "logit_bias": {"5": 1000}}, 400, None),
    ("17 messages", "chat", {**CHAT, "messages": MSG * 17}, 400, "limit_exceeded"),
    ("20k characters", "chat", {**CHAT, "messages": [{"role": "user", "content": "x" * 20_001}]}, 400,
     "limit_exceeded"),
    ("text split over parts", "chat", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 10_001}, {"type": "text", "text": "y" * 10_000}]}]}, 400, "limit_exceeded"),
    ("no messages", "chat", {**CHAT, "messages": []}, 400, None),
    ("unknown role", "chat", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("an image for a text model", "chat", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]}, 400,
     "unsupported_content"),
    ("priority above the tier", "chat", {**CHAT, "priority": "urgent"}, 400, None),
    ("a 300-character user", "chat", {**CHAT, "user": "u" * 300}, 400, None),
    ("a 300-character session", "chat", {**CHAT, "session_id": "s" * 300}, 400, None),
    ("top_logprobs without logprobs", "chat", {**CHAT, "top_logprobs": 2}, 400, None),
    ("a string temperature", "chat", {**CHAT, "temperature": "hot"}, 400, None),
    ("stream_options not a bool", "chat", {**CHAT, "stream_options": {"include_usage": "maybe"}}, 400, None),
    ("a lone surrogate", "chat", '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "invalid_json"),
    ("deeply nested JSON", "chat", json.dumps(CHAT)[:-1] + f', "extra": {DEEP}}}', 400, None),
    ("unknown model", "chat", {**CHAT, "model": "gpt-5"}, 404, "model_not_found"),
    ("a model name of 10k characters", "chat", {**CHAT, "model": "m" * 10_000}, 400, None),
    ("body over INFERSTACK_MAX_BODY_BYTES", "chat", {**CHAT, "messages": [
        {"role": "user", "content": "x" * (300 * 1024)}]}, 413, "request_too_large"),
    ("five prompts", "completions", {**COMPLETION, "prompt": ["a"] * 5}, 400, "limit_exceeded"),
    ("20k prompt characters", "completions", {**COMPLETION, "prompt": ["x" * 10_001, "y" * 10_000]}, 400,
     "limit_exceeded"),
    ("token prompt beyond the context", "completions", {**COMPLETION, "prompt": [5] * 20_000}, 400,
     "context_length_exceeded"),
    ("token id beyond the vocabulary", "completions", {**COMPLETION, "prompt": [5, 10**6]}, 400, "invalid_value"),
    ("token id 2^64", "completions", {**COMPLETION, "prompt": [2**64]}, 400, None),
    ("negative token id", "completions", {**COMPLETION, "prompt": [[1], [-1]]}, 400, None),
    ("an empty prompt in the list", "completions", {**COMPLETION, "prompt": ["a", ""]}, 400, "invalid_value"),
    ("suffix", "completions", {**COMPLETION, "suffix": "x"}, 400, "unsupported_parameter"),
]


@pytest.mark.parametrize("case,endpoint,body,status,code", REJECTED, ids=[c[0] for c in REJECTED])
def test_hostile_requests_get_an_openai_4xx_and_enqueue_nothing(idle, rclient, case, endpoint, body, status, code):
    url = f"{idle.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert_openai_error(r, status, code)
    assert queued(rclient) == 0
    assert not list(rclient.scan_iter(f"{keys.tag('tiny')}:req:*"))


def _raw(url: str, head: list[str], body: bytes = b"") -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            more = sock.recv(65536)
            if not more:
                break
            reply += more
        return reply


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_an_oversized_body_is_refused_before_it_is_sent(idle, rclient):
    """Content-Length says 1 GB and no byte follows: the answer must come at once (a
    server waiting for the body would never answer; the socket's timeout fails it)."""
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
            "Content-Length: 1000000000"]
    reply = _raw(idle.url, head)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"request_too_large"' in reply


def test_a_chunked_body_is_cut_off_at_the_limit(idle, rclient):
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))  # 320 KiB > 256 KiB
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
            "Transfer-Encoding: chunked"]
    reply = _raw(idle.url, head, chunks)  # no terminating chunk: the server stops reading first
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert queued(rclient) == 0


# -- with a worker: documented behaviour and other tenants ----------------------------------


@pytest.fixture(scope="module")
def live(redis_server, tmp_path_factory, tiny_model_dir):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("hostile-live")
    s = Stack(redis_server.url, registry_toml(tmp / "models.toml", tiny_model_dir), tmp / "cache", api_kw=LIMITS)
    yield s
    s.stop()


@pytest.mark.parametrize("extra", [
    {"top_k": 2**63 - 1},  # at or beyond the vocabulary: the same as no top-k
    {"seed": -(2**63), "temperature": 1.0},
    {"seed": 2**63 - 1, "temperature": 1.0},
    {"deadline_s": 120},  # the default: allowed (only longer is refused)
    {"stop_token_ids": list(range(8)), "logit_bias": {str(i): 5 for i in range(8)}},  # at the caps
    {"messages": MSG * 16, "stop": ["a", "b", "c", "d"]},
], ids=["top_k int64 max", "seed int64 min", "seed int64 max", "deadline default", "lists at caps",
        "messages and stops at caps"])
def test_values_at_the_edges_are_served(live, extra):
    r = httpx.post(f"{live.url}/v1/chat/completions", json={**CHAT, "ignore_eos": True, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 4  # a stop may end it sooner


def test_a_large_request_never_holds_up_health_or_another_tenants_stream(live, monkeypatch):
    """Tenant A's chat template is held mid-render (in the offload pool); meanwhile
    /health answers and tenant B's request streams to [DONE]. Were templating on the
    event loop, neither could answer until A's was released."""
    from api.catalog import TextModel

    release, entered = threading.Event(), threading.Event()
    render = TextModel._render_chat

    def held(self, messages, *more):
        if "HOLD" in messages[-1]["content"]:
            entered.set()
            assert release.wait(60)
        return render(self, messages, *more)

    monkeypatch.setattr(TextModel, "_render_chat", held)
    result = {}

    def tenant_a():
        result["a"] = httpx.post(f"{live.url}/v1/chat/completions", timeout=90, json={
            **CHAT, "user": "a", "messages": [{"role": "user", "content": "HOLD " + "x" * 19_000}]})

    a = threading.Thread(target=tenant_a)
    a.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{live.url}/health", timeout=20).status_code == 200
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", timeout=30, json={
                **CHAT, "user": "b", "stream": True, "ignore_eos": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        assert not release.is_set()  # all of that while A's template was still held
    finally:
        release.set()
        a.join(60)
    assert_openai_error(result["a"], 400, "context_length_exceeded")  # tokenized, then refused: too long


def test_tenants_streams_are_unaffected_by_a_hostile_neighbour(live):
    """Tenant B's greedy answer is the same alone and while tenant A sends hostile
    requests (oversized, malformed, over the limits) as fast as it can."""
    body = {**CHAT, "user": "b", "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    alone = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60).json()
    stop = threading.Event()
    statuses: list[int] = []

    def hostile():
        with httpx.Client(timeout=30) as client:
            cases = [c for c in REJECTED if c[1] == "chat"]
            i = 0
            while not stop.is_set():
                _, _, payload, _, _ = cases[i % len(cases)]
                kw = {"content": payload} if isinstance(payload, str) else {"json": {"user": "a", **payload}}
                statuses.append(client.post(f"{live.url}/v1/chat/completions", **kw,
                                            headers={"Content-Type": "application/json"}).status_code)
                i += 1

    threads = [threading.Thread(target=hostile) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with httpx.stream("POST", f"{live.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == alone["choices"][0]["message"]["content"]
    assert statuses and all(400 <= s < 500 for s in statuses), sorted(set(statuses))


# -- keyed mode: every route but /health needs a key ---------------------------------------


@pytest.fixture(scope="module")
def keyed(redis_server, tmp_path_factory, tiny_model_dir):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("hostile-keyed")
    keys_file = tmp / "keys.toml"
    keys_file.write_text(f'[keys."{hash_key("sk-a")}"]\nuser = "a"\n\n[keys."{hash_key("sk-ops")}"]\n'
                         'user = "ops"\nadmin = true\n')
    s = Stack(redis_server.url, registry_toml(tmp / "models.toml", tiny_model_dir), tmp / "cache",
              api_kw={"keys_file": keys_file, "admin_key": "sk-admin"}, key="sk-a")
    yield s
    s.stop()


def _routes(app):
    routes = [r for top in app.routes for r in getattr(getattr(top, "original_router", None), "routes", [top])]
    for route in routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                yield method, route.path.replace("{job_id}", "job-1").replace("{index}", "0").replace(
                    "{model:path}", "tiny").replace("{model}", "tiny")


def test_every_route_but_health_needs_a_key(keyed):
    routes = sorted(set(_routes(keyed.api.app)))
    assert ("GET", "/metrics") in routes and ("GET", "/v1/models") in routes and ("GET", "/ready") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
            r = httpx.request(method, f"{keyed.url}{path}", headers=headers, json={}, timeout=30)
            if path == "/health":
                assert r.status_code == 200
            else:
                assert_openai_error(r, 401)
    assert httpx.get(f"{keyed.url}/docs", timeout=10).status_code == 404  # no docs UI: it could not send a key


def test_metrics_and_stats_need_the_admin_key(keyed):
    tenant, admin, ops = ({"Authorization": f"Bearer {k}"} for k in ("sk-a", "sk-admin", "sk-ops"))
    assert httpx.get(f"{keyed.url}/v1/models", headers=tenant, timeout=10).status_code == 200
    assert httpx.get(f"{keyed.url}/ready", headers=tenant, timeout=10).status_code == 200
    assert httpx.get(f"{keyed.url}/openapi.json", headers=tenant, timeout=10).json()["openapi"]
    assert_openai_error(httpx.get(f"{keyed.url}/metrics", headers=tenant, timeout=10), 403, "admin_required")
    assert_openai_error(httpx.get(f"{keyed.url}/v1/stats", headers=tenant, timeout=10), 403, "admin_required")
    for who in (admin, ops):
        r = httpx.get(f"{keyed.url}/metrics", headers=who, timeout=10)
        assert r.status_code == 200 and "inferstack_" in r.text


def test_open_mode_with_an_admin_key_guards_metrics(redis_url, tiny_registry, tmp_path):
    s = Stack(redis_url, tiny_registry, tmp_path / "cache", workers=0, api_kw={"admin_key": "sk-admin"})
    try:
        assert_openai_error(httpx.get(f"{s.url}/metrics", timeout=10), 403, "admin_required")
        assert httpx.get(f"{s.url}/metrics", headers={"Authorization": "Bearer sk-admin"}, timeout=10).status_code == 200
        assert httpx.get(f"{s.url}/v1/models", timeout=10).status_code == 200  # open mode: tenants need no key
    finally:
        s.stop()
