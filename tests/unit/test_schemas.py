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
    {"messages": MSG, "top_logprobs": 3},
    # beyond 64 bits (JSON integers are unbounded; the wire to the workers is not)
    {"messages": MSG, "seed": 2**64},
    {"messages": MSG, "seed": -(2**63) - 1},
    {"messages": MSG, "top_k": 2**63},
    {"messages": MSG, "stop_token_ids": [2**64]},
    {"messages": MSG, "stop_token_ids": [-1]},
    {"messages": MSG, "max_tokens": 2**64},
    {"messages": MSG, "min_tokens": 2**70},
    # no NaN or Infinity anywhere
    {"messages": MSG, "deadline_s": float("inf")},
    {"messages": MSG, "deadline_s": float("nan")},
    {"messages": MSG, "temperature": float("nan")},
    {"messages": MSG, "logit_bias": {"5": float("inf")}},
    {"messages": MSG, "logit_bias": {"5": 101}},
    {"messages": MSG, "presence_penalty": 3},
    {"messages": MSG, "priority": "urgent"},
    {"messages": [{"role": "wizard", "content": "x"}]},
])
def test_invalid_chat_requests_are_rejected(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", **bad)


def test_chat_defaults_and_extensions():
    r = ChatCompletionRequest(model="m", messages=MSG, stop="END", max_completion_tokens=5, top_k=-1,
                              ignore_eos=True, min_tokens=2)
    assert r.stop == ["END"] and r.requested_max_tokens == 5 and r.ignore_eos and r.n == 1


def _error(cls, **body):
    from fastapi.exceptions import RequestValidationError

    from api.errors import _validation_error

    with pytest.raises(ValidationError) as e:
        cls(**body)
    return _validation_error(RequestValidationError(e.value.errors())).body()["error"]


FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("extra,param,code", [
    ({"unknown_openai_field": 1}, "unknown_openai_field", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio", "unsupported_parameter"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"verbosity": "low"}, "verbosity", "unsupported_parameter"),
    ({"guided_json": {}}, "guided_json", "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_value"),
    ({"service_tier": "flex"}, "service_tier", "unsupported_value"),
    ({"modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "unsupported_value"),
    ({"tools": [FN], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
     "tool_choice", "unsupported_value"),
    ({"tools": [FN], "tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice", "unsupported_value"),
    ({"response_format": {"type": "grammar", "grammar": "x"}}, "response_format.type", "unsupported_value"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "x"}}]}]},
     "messages[0].content[0].type", "unsupported_value"),
    ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages[0].audio",
     "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x", "cache_control": {}}]}, "messages[0].cache_control",
     "unsupported_parameter"),
    ({"stream_options": {"include_usage": True, "chunk_size": 3}}, "stream_options.chunk_size",
     "unsupported_parameter"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "response_format",
     "invalid_value"),
])
def test_unimplemented_fields_and_values_are_refused_by_name(extra, param, code):
    err = _error(ChatCompletionRequest, **{"model": "m", "messages": MSG, **extra})
    assert (err["param"], err["code"]) == (param, code), err
    assert err["message"]


def test_what_the_sdk_may_send_is_accepted():
    """Fields the openai SDK sends when asked, with no effect here, and nulls."""
    ChatCompletionRequest(model="m", messages=MSG, store=False, metadata={"k": "v"}, service_tier="auto",
                          user="u", safety_identifier="s", prompt_cache_key="p", prompt_cache_retention="in_memory",
                          stream_options={"include_usage": True, "include_obfuscation": False},
                          parallel_tool_calls=False, tools=[FN], tool_choice={"type": "function", "function": {"name": "f"}},
                          logit_bias={"5": -100}, modalities=["text"], audio=None, prediction=None, reasoning_effort="low",
                          response_format={"type": "json_schema", "json_schema": {
                              "name": "m", "schema": {"type": "object"}, "strict": True}})
    history = [{"role": "user", "content": "x", "name": "ann"},
               {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]}]
    ChatCompletionRequest(model="m", messages=history)


def test_completion_fields():
    assert CompletionRequest(model="m", prompt="x", best_of=1).best_of == 1
    assert _error(CompletionRequest, model="m", prompt="x", best_of=3)["code"] == "unsupported_value"
    assert _error(CompletionRequest, model="m", prompt="x", suffix="y")["param"] == "suffix"
    assert CompletionRequest(model="m", prompt="x", structured_outputs={"choice": ["a", "b"]}).structured_outputs


def test_media_bodies_refuse_unknown_fields():
    from api.schemas import ImageGenerationRequest, SpeechRequestBody, VideoGenerationRequest

    assert _error(ImageGenerationRequest, prompt="x", quality="hd")["code"] == "unsupported_value"
    assert _error(ImageGenerationRequest, prompt="x", style="vivid")["code"] == "unsupported_parameter"
    assert _error(ImageGenerationRequest, prompt="x", nonsense=1)["code"] == "unsupported_parameter"
    ImageGenerationRequest(prompt="x", moderation="low", output_format="png", quality="auto", background="auto")
    assert _error(SpeechRequestBody, input="x", voice="af", response_format="opus")["code"] == "unsupported_value"
    SpeechRequestBody(input="x", voice="af", instructions="cheerful")
    assert _error(VideoGenerationRequest, prompt="x", seconds="4")["param"] == "seconds"


def test_json_spellings_of_infinity_and_nan_are_refused():
    for raw in ('{"model": "m", "messages": [{"role": "user", "content": "x"}], "deadline_s": Infinity}',
                '{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}',
                '{"model": "m", "messages": [{"role": "user", "content": "x"}], "frequency_penalty": -1e999}'):
        with pytest.raises(ValidationError, match="finite"):
            ChatCompletionRequest.model_validate_json(raw)


def test_64_bit_integers_are_accepted_at_their_bounds():
    r = ChatCompletionRequest(model="m", messages=MSG, seed=2**63 - 1, top_k=2**63 - 1, stop_token_ids=[2**63 - 1])
    assert r.seed == 2**63 - 1
    assert ChatCompletionRequest(model="m", messages=MSG, seed=-(2**63)).seed == -(2**63)


def test_top_k_at_or_beyond_the_vocabulary_means_off():
    assert _params(ChatCompletionRequest(model="m", messages=MSG, top_k=2**63 - 1), {}).top_k == 0
    assert _params(ChatCompletionRequest(model="m", messages=MSG, top_k=99), {}).top_k == 99


def test_completion_prompt_forms():
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16
    assert CompletionRequest(model="m", prompt=[1, 2, 3]).prompt == [1, 2, 3]
    assert CompletionRequest(model="m", prompt=[[1], [2]]).prompt == [[1], [2]]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=[])


def _params(body, defaults):
    from api.routes._text import sampling_params

    return sampling_params(body, 8, n=1, logprobs=False, top_logprobs=0, vocab_size=100, defaults=defaults)


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
