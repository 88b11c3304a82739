"""Every sampling parameter has its effect, through the API with the official openai
SDK (extensions via extra_body), on the real SmolLM2."""

import threading
from collections import Counter

import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a dragon."}]


def chat(client, messages=STORY, **kw):
    kw.setdefault("max_tokens", 20)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def text(r, i=0):
    return r.choices[i].message.content


@pytest.fixture(scope="module")
def greedy_story(client):
    return text(chat(client, temperature=0))


def test_greedy_is_reproducible(client, greedy_story):
    assert text(chat(client, temperature=0)) == greedy_story


def test_seed_reproducible_and_seed_dependent(client):
    a = text(chat(client, temperature=1.0, seed=7))
    assert text(chat(client, temperature=1.0, seed=7)) == a
    assert text(chat(client, temperature=1.0, seed=8)) != a


def test_seed_is_reproducible_inside_a_busy_batch(client):
    alone = text(chat(client, temperature=1.0, seed=99))
    noise = [threading.Thread(target=chat, args=(client,), kwargs={"temperature": 1.0, "max_tokens": 30})
             for _ in range(4)]
    for t in noise:
        t.start()
    crowded = text(chat(client, temperature=1.0, seed=99))
    for t in noise:
        t.join()
    assert crowded == alone


@pytest.mark.parametrize("kw", [
    {"top_p": 1e-4},
    {"extra_body": {"top_k": 1}},
    {"extra_body": {"min_p": 1.0}},
])
def test_truncation_to_the_top_token_equals_greedy(client, greedy_story, kw):
    assert text(chat(client, temperature=1.5, seed=1, **kw)) == greedy_story


def test_high_temperature_departs_from_greedy(client, greedy_story):
    assert text(chat(client, temperature=1.5, seed=3)) != greedy_story


@pytest.mark.parametrize("kw", [{"max_tokens": 5}, {"max_completion_tokens": 5}])
def test_max_tokens(client, kw):
    r = client.chat.completions.create(model=MODEL, messages=STORY, temperature=0, **kw)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_stop_strings_including_across_token_boundaries(client):
    full = text(chat(client, PARIS, temperature=0, max_tokens=30))
    assert "Paris" in full
    for stop in ["Paris", "pital of Fr"]:  # the second spans several tokens
        r = chat(client, PARIS, temperature=0, max_tokens=30, stop=[stop, "zzz-never"])
        assert text(r) == full[: full.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_stop_text_is_not_streamed(client):
    full = text(chat(client, PARIS, temperature=0, max_tokens=30))
    pieces = [c.choices[0].delta.content or "" for c in chat(client, PARIS, temperature=0, max_tokens=30,
                                                             stop=["Paris"], stream=True) if c.choices]
    assert "".join(pieces) == full[: full.index("Paris")]


def test_n_choices(client):
    r = chat(client, temperature=1.0, seed=5, n=3, max_tokens=12)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) >= 2
    assert r.usage.completion_tokens == 36


def test_logprobs_shape(client):
    r = chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and item.logprob <= 0
        assert item.top_logprobs[0].token == item.token  # greedy picked the most likely token
        assert item.logprob == pytest.approx(tops[0])


def test_completions_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(t) <= 2 for t in lp.top_logprobs)


@pytest.mark.parametrize("kw", [
    {"frequency_penalty": 1.5},
    {"presence_penalty": 1.5},
    {"extra_body": {"repetition_penalty": 1.5}},
])
def test_penalties_break_repetition(client, kw):
    def complete(**extra):
        r = client.completions.create(model=MODEL, prompt="cat " * 16, max_tokens=16, temperature=0, **extra)
        return r.choices[0].text

    plain = complete()
    repeated, times = Counter(plain.replace(" ", "")).most_common(1)[0]
    assert times >= 8  # greedy falls into a loop
    assert complete(**kw).count(repeated) < times


def test_ignore_eos_and_min_tokens(client):
    natural = chat(client, PARIS, temperature=0, max_tokens=40)
    assert natural.usage.completion_tokens < 30 and natural.choices[0].finish_reason == "stop"
    forced = chat(client, PARIS, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 40 and forced.choices[0].finish_reason == "length"
    longer = chat(client, PARIS, temperature=0, max_tokens=40, extra_body={"min_tokens": 25})
    assert longer.usage.completion_tokens >= 25
