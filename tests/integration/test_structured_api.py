"""Structured outputs and tool calling through the real API and worker on the tiny
model. Its unconstrained output is noise, so valid JSON and well-formed calls can
only come from the grammar; bad schemas and tools are 400s that enqueue nothing."""

import json
import re

import httpx
import jsonschema
import pytest
import redis

from broker import keys
from tests.integration.test_pipeline import sse_events
from tests.stack import Stack, script_output
from tests.tiny import registry_toml

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["answer", "score"], "additionalProperties": False}
MSG = [{"role": "user", "content": "Hello world"}]
# The tiny tokenizer spends about one token per character of the call markup.
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}, "strict": True}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir, tmp_path_factory):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    tmp = tmp_path_factory.mktemp("structured")
    registry = registry_toml(tmp / "models.toml", tiny_model_dir)
    # The hermes tool prompt is long in the tiny tokenizer's 400 tokens; rotary positions run past 512.
    registry.write_text(registry.read_text() + "context_length = 2048\n")
    s = Stack(redis_server.url, registry, tmp / "cache")
    yield s
    s.stop()


def chat(stack, **body):
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "tiny", "messages": MSG, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def chat_stream(stack, **body):
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": MSG, "stream": True, **body}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    return [e for e in events[:-1] if e["choices"]]


def test_json_schema_whole_and_streamed(stack):
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    body = chat(stack, response_format=fmt, max_tokens=60, temperature=0)
    choice = body["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert choice["finish_reason"] == "stop"
    chunks = chat_stream(stack, response_format=fmt, max_tokens=60, temperature=0)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == choice["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1


def test_structured_outputs_on_chat_and_completions(stack):
    body = chat(stack, structured_outputs={"choice": ["red", "green", "blue"]}, n=3, temperature=1.0, seed=3)
    assert {c["message"]["content"] for c in body["choices"]} <= {"red", "green", "blue"}
    r = httpx.post(f"{stack.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "The code is", "max_tokens": 20, "structured_outputs": {"regex": "[A-F]{4}-[0-9]{3}"}})
    assert r.status_code == 200, r.text
    assert re.fullmatch("[A-F]{4}-[0-9]{3}", r.json()["choices"][0]["text"])


def test_named_tool_choice_returns_a_tool_call(stack):
    body = chat(stack, tools=[ADD, NOW], tool_choice={"type": "function", "function": {"name": "add"}},
                max_tokens=150, temperature=0)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "add" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD["function"]["parameters"])


def test_required_tool_calls_stream_in_openai_delta_shape(stack):
    chunks = chat_stream(stack, tools=[ADD, NOW], tool_choice="required", parallel_tool_calls=False,
                         max_tokens=150, temperature=0)
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    first = deltas[0]
    assert set(first) == {"index", "id", "type", "function"} and first["index"] == 0
    assert first["function"]["name"] in ("add", "now") and first["function"]["arguments"] == ""
    assert all(set(d) == {"index", "function"} and d["index"] == 0 for d in deltas[1:])
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    tool = ADD if first["function"]["name"] == "add" else NOW
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]


def test_tool_results_go_back_to_the_model(stack):
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    body = chat(stack, messages=history, tools=[ADD], max_tokens=5)
    assert body["usage"]["prompt_tokens"] > chat(stack, tools=[ADD], max_tokens=5)["usage"]["prompt_tokens"]


def test_logit_bias_is_applied(stack):
    tokenizer = stack.workers[0].engines["tiny"].tokenizer
    r = httpx.post(f"{stack.url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "temperature": 0,
        "logit_bias": {"42": 100}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode([42] * 4)


@pytest.mark.parametrize("extra,param,code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema", "invalid_json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema", "invalid_json_schema"),
    ({"structured_outputs": {"json": {"type": "object", "required": "a"}}}, "structured_outputs.json",
     "invalid_json_schema"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs.regex", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]},
     "tools[0].function.parameters", "invalid_json_schema"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice", "invalid_value"),
    ({"tools": [ADD, ADD]}, "tools", "invalid_value"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "unsupported_value"),
    ({"made_up": True}, "made_up", "unsupported_parameter"),
])
def test_bad_constraints_are_400_before_anything_is_enqueued(stack, redis_server, extra, param, code):
    r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": "tiny", "messages": MSG, "stream": True,
                                                             **extra}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.hget(keys.tier_state("tiny"), "len") in (None, "0")
    finally:
        client.close()


@pytest.mark.parametrize("script,content,calls", [
    ('<think>maybe <tool_call>\n{"name": "now", "arguments": {}}\n</tool_call></think>\n\nIt is noon.',
     "It is noon.", []),
    ('<think>I need the time.</think>\n\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
     None, ["now"]),
])
def test_tool_calls_inside_the_reasoning_are_not_calls(redis_server, tiny_model_dir, tmp_path, script, content,
                                                       calls):
    """A reasoning model's output under the tools grammar (its sampler scripted: the tiny
    model cannot reason; the grammar still checks every token). Its own model name, so
    the module's stack on the same Redis never claims its requests."""
    registry = registry_toml(tmp_path / "models.toml", tiny_model_dir, name="tiny-think", reasoning=True)
    registry.write_text(registry.read_text() + "context_length = 2048\n")
    stack = Stack(redis_server.url, registry, tmp_path / "cache")
    length = script_output(stack.workers[0].engines["tiny-think"], script)
    try:
        body = chat(stack, model="tiny-think", tools=[NOW], max_tokens=length + 5)
        message = body["choices"][0]["message"]
        assert message["content"] == content
        assert [c["function"]["name"] for c in message.get("tool_calls") or []] == calls
        assert "<think>" not in (message["content"] or "") and message["reasoning_content"]
        assert body["choices"][0]["finish_reason"] == ("tool_calls" if calls else "stop")
    finally:
        stack.stop()
