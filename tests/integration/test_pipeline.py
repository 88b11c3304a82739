"""enqueue -> claim -> generate -> publish -> relay, through the real API and a real
worker on the tiny model and a real redis-server."""

import json

import httpx
import pytest

from broker import keys

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello world"}]}


def sse_events(response):
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_roundtrip_with_usage(tiny_stack):
    r = httpx.post(f"{tiny_stack.url}/v1/chat/completions",
                   json={**CHAT, "max_tokens": 12, "ignore_eos": True, "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12


def test_streaming_relays_every_token_then_usage_and_done(tiny_stack):
    with httpx.stream("POST", f"{tiny_stack.url}/v1/chat/completions", timeout=30, json={
        **CHAT, "max_tokens": 20, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    chunks = events[:-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) >= 10  # token by token, not one blob


def test_streamed_text_equals_non_streamed_text(tiny_stack):
    body = {**CHAT, "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    whole = httpx.post(f"{tiny_stack.url}/v1/chat/completions", json=body, timeout=30).json()
    with httpx.stream("POST", f"{tiny_stack.url}/v1/chat/completions", json={**body, "stream": True},
                      timeout=30) as r:
        streamed = "".join(e["choices"][0]["delta"].get("content", "")
                           for e in sse_events(r) if e != "[DONE]" and e["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]


def test_completions_multi_prompt_and_n(tiny_stack):
    r = httpx.post(f"{tiny_stack.url}/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": ["Hello", "The quick"], "n": 2, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    assert r.json()["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({**CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ({**CHAT, "temperature": 9}, 400, "temperature"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({**CHAT, "max_tokens": 100_000}, 400, "messages"),
])
def test_rejections_are_openai_shaped_and_enqueue_nothing(tiny_stack, rclient, body, status, param):
    r = httpx.post(f"{tiny_stack.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert rclient.hget(keys.tier_state("tiny"), "len") in (None, "0")
    assert not list(rclient.scan_iter(match=f"{keys.tag('tiny')}:req:*"))


def test_malformed_json_is_400(tiny_stack):
    r = httpx.post(f"{tiny_stack.url}/v1/chat/completions", content=b"{nope",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_context_overflow_names_the_limit(tiny_stack):
    r = httpx.post(f"{tiny_stack.url}/v1/completions", timeout=10,
                   json={"model": "tiny", "prompt": [5] * 600, "max_tokens": 4})
    assert r.status_code == 400
    assert "512" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_health_ready_and_models(tiny_stack):
    assert httpx.get(f"{tiny_stack.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{tiny_stack.url}/ready").json()
    assert ready["status"] == "ready" and ready["models"] == ["tiny"]
    assert [m["id"] for m in httpx.get(f"{tiny_stack.url}/v1/models").json()["data"]] == ["tiny"]


def test_worker_heartbeat_advertises_itself(tiny_stack, rclient):
    wid = tiny_stack.workers[0].worker.id
    info = rclient.hgetall(keys.worker(wid))
    assert json.loads(info["models"]) == ["tiny"]
    assert info["device"] == "cpu" and int(info["free_memory_bytes"]) > 0


def test_think_block_comes_back_as_reasoning_content(redis_url, tiny_model_dir, tmp_path):
    """A reasoning model's <think>...</think> is split from the answer, streamed and not.
    The tiny model cannot reason, so its sampler is scripted to emit the tokens of a
    reasoning answer; everything downstream (detokenizer, splitter, wire, API) is real."""
    from tests.stack import Stack, script_output
    from tests.tiny import registry_toml

    registry = registry_toml(tmp_path / "models.toml", tiny_model_dir, reasoning=True)
    stack = Stack(redis_url, registry, tmp_path / "cache")
    script_output(stack.workers[0].engines["tiny"], "<think>deep thought</think>\n\nThe answer.")
    try:
        body = {**CHAT, "max_tokens": 40}
        msg = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]
        assert msg["reasoning_content"] == "deep thought" and msg["content"] == "The answer."
        with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as r:
            deltas = [e["choices"][0]["delta"] for e in sse_events(r) if e != "[DONE]" and e["choices"]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "deep thought"
        assert "".join(d.get("content", "") for d in deltas) == "The answer."
    finally:
        stack.stop()


@pytest.mark.parametrize("extra,param", [
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"stop": ["x" * 300]}, "stop"),
])
def test_inputs_that_could_break_a_batch_are_rejected_up_front(tiny_stack, extra, param):
    r = httpx.post(f"{tiny_stack.url}/v1/chat/completions", json={**CHAT, "max_tokens": 3, **extra}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
