"""What a hostile tenant tries against the real stack (SmolLM2, separate processes,
the official openai SDK): numbers the wire cannot carry, huge lists and bodies, and
prying into another tenant's cached prompt or session. The full table of cases runs
on the tiny model: tests/integration/test_hostile.py."""

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "Hi"}]
# long enough for two whole 64-token blocks of shared prefix
SYSTEM = ("You are the support assistant of a small bakery. " * 16).strip()


@pytest.mark.parametrize("extra,param", [
    ({"seed": 2**64}, "seed"),
    ({"top_k": 2**64}, "top_k"),
    ({"deadline_s": 1e9}, "deadline_s"),
    ({"stop_token_ids": [2] * 100_000}, "stop_token_ids"),
], ids=["seed 2^64", "top_k 2^64", "deadline 1e9", "100k stop_token_ids"])
def test_values_the_server_cannot_honour_are_a_400_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, extra_body=extra)
    assert err.value.body["param"] == param


def test_infinity_and_an_8mb_body_are_refused_before_any_work(stack):
    r = httpx.post(f"{stack.url}/v1/chat/completions", headers={"Content-Type": "application/json"}, timeout=60,
                   content=b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "x"}], '
                           b'"deadline_s": Infinity}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "deadline_s"
    big = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 1_600_000}]}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=big, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "limit_exceeded"


def _cached(client, user, messages, **extra):
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4, user=user,
                                       extra_body=extra)
    return r.usage.prompt_tokens_details.cached_tokens


def test_another_tenants_prompt_prefix_is_neither_reused_nor_revealed(client):
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When do you open?"}]
    _cached(client, "tenant-a", prompt)
    _cached(client, "tenant-a", prompt[:1] + [{"role": "user", "content": "Do you sell rye bread?"}])
    assert _cached(client, "tenant-a", prompt) >= 128  # tenant a's own prefix is reused ...
    assert _cached(client, "tenant-b", prompt) == 0  # ... and tenant b cannot tell that anyone sent it


def test_session_ids_cannot_be_spliced_across_user_names(client):
    messages = [{"role": "user", "content": "Remember the secret word: marmalade. Reply OK."}]
    _cached(client, "p\0x", messages, session_id="y")
    follow = messages + [{"role": "assistant", "content": "OK"}, {"role": "user", "content": "What was it?"}]
    assert _cached(client, "p\0x", follow, session_id="y") > 0  # the same user and session: reused
    assert _cached(client, "p", follow, session_id="x\0y") == 0  # the spliced pair is another session
