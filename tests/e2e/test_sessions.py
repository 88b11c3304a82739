"""Multi-turn chat with a session id on the real model: later turns reuse the cache
kept in the worker's DRAM and answer exactly as a full recompute does."""

import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"


def test_follow_up_turns_reuse_the_session_cache_and_match_recompute(client):
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three colours of the rainbow."}]
    for turn, question in enumerate(["Which of them is the warmest?", "Spell it backwards."]):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24,
                                           extra_body={"session_id": "e2e-rainbow"})
        if turn > 0:
            assert r.usage.prompt_tokens_details.cached_tokens > 0.5 * r.usage.prompt_tokens
        recompute = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
        assert r.choices[0].message.content == recompute.choices[0].message.content
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": question}]
