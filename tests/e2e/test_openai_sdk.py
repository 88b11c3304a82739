"""What a user does with the official openai SDK against the real model."""

import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client):
    assert MODEL in [m.id for m in client.models.list().data]


def test_chat_answers_paris_with_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=30)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_token_by_token_with_usage_chunk(client):
    arrivals, text, usage_chunks, finish = [], [], [], None
    stream = client.chat.completions.create(model=MODEL, messages=PARIS, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.usage:
            usage_chunks.append(chunk)
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "Paris" in "".join(text) and finish == "stop"
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunk  # the usage chunk is last
    assert usage_chunks[0].usage.completion_tokens >= 5
    # many chunks, spread over time: arrivals are not one buffered blob
    assert len(text) >= 5
    assert len({round(t, 3) for t in arrivals}) >= 5


def test_stream_ends_with_done_on_the_wire(stack):
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": PARIS, "max_tokens": 8, "stream": True,
        "stream_options": {"include_usage": True}}) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["usage"]["completion_tokens"] <= 8


def test_completions_plain_and_streaming(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 8
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].text


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=PARIS)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": 3.0}, "temperature"),
    ({"messages": []}, "messages"),
])
def test_invalid_parameters_400(client, kwargs, param):
    args = {"model": MODEL, "messages": PARIS, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.body["param"] == param


def test_malformed_json_400(stack):
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=b'{"model": ', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_prompt_longer_than_context_400_names_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1] * 9000, max_tokens=4)
    assert "8192" in e.value.body["message"] and e.value.body["code"] == "context_length_exceeded"
