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
