import pytest
from pydantic import ValidationError

from api.schemas import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("bad", [
    {"messages": []},
    {"messages": MSG, "max_tokens": -1},
    {"messages": MSG, "max_tokens": 0},
    {"messages": MSG, "temperature": 2.5},
    {"messages": MSG, "temperature": -0.1},
    {"messages": MSG, "top_p": 0},
    {"messages": MSG, "n": 0},
    {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]},
    {"messages": MSG, "top_logprobs": 3},
    {"messages": MSG, "presence_penalty": 3},
    {"messages": MSG, "priority": "urgent"},
    {"messages": [{"role": "wizard", "content": "x"}]},
])
def test_invalid_chat_requests_are_rejected(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", **bad)


def test_chat_defaults_and_extensions():
    r = ChatCompletionRequest(model="m", messages=MSG, stop="END", max_completion_tokens=5, top_k=-1,
                              ignore_eos=True, min_tokens=2, unknown_openai_field=1)
    assert r.stop == ["END"] and r.requested_max_tokens == 5 and r.ignore_eos and r.n == 1


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert CompletionRequest(model="m", prompt=[[1], [2]]).prompt == [[1], [2]]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[])


def _params(body, defaults):
    from api.routes._text import sampling_params

    return sampling_params(body, 8, n=1, logprobs=False, top_logprobs=0, max_n=4, vocab_size=100,
                           defaults=defaults)


def test_model_sampling_defaults_fill_only_what_the_request_leaves_unset():
    card = {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    unset = _params(ChatCompletionRequest(model="m", messages=MSG), card)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.2, 0.9, 20, 1.1)
    # An explicit value wins, even one equal to the OpenAI default.
    explicit = _params(ChatCompletionRequest(model="m", messages=MSG, temperature=1.0, top_k=0, top_p=None), card)
    assert (explicit.temperature, explicit.top_k, explicit.top_p) == (1.0, 0, 0.9)
    plain = _params(ChatCompletionRequest(model="m", messages=MSG), {})
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_registry_rejects_unknown_sampling_defaults(tmp_path):
    from inferstack.registry import Registry

    path = tmp_path / "models.toml"
    path.write_text('[models.m]\nmodality = "text"\nsampling = { temperature = 0.3 }\n')
    assert Registry.load(path)["m"].sampling == {"temperature": 0.3}
    path.write_text('[models.m]\nmodality = "text"\nsampling = { temprature = 0.3 }\n')
    with pytest.raises(ValueError, match="temprature"):
        Registry.load(path)
