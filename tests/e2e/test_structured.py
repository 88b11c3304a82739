"""Structured outputs and tool calling with the official openai SDK's helpers on the
real SmolLM2-135M. No prompt asks for JSON or a tool call: unconstrained, this model
answers in prose, so only real constrained decoding passes these."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"


class City(BaseModel):
    name: Annotated[str, Field(max_length=24)]
    country: Annotated[str, Field(max_length=24)]
    is_capital: bool


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(ge=0, le=100)
    b: int = Field(ge=0, le=100)


@pytest.fixture(scope="module")
def sdk(client):
    """The shared client with room for constrained batches on a loaded 2-core machine."""
    return client.with_options(timeout=600)


def ask(text):
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_response_format(sdk):
    r = sdk.chat.completions.parse(model=MODEL, messages=ask("Tell me about Paris."), response_format=City,
                                      temperature=0, max_tokens=60)
    assert isinstance(r.choices[0].message.parsed, City) and r.choices[0].finish_reason == "stop"


def test_stream_helper_with_a_pydantic_response_format(sdk):
    with sdk.chat.completions.stream(model=MODEL, messages=ask("Tell me a joke."), response_format=City,
                                        temperature=0, max_tokens=60) as stream:
        kinds = {event.type for event in stream}
        final = stream.get_final_completion()
    assert "content.delta" in kinds and "content.done" in kinds
    assert isinstance(final.choices[0].message.parsed, City) and final.choices[0].finish_reason == "stop"


def test_json_object_is_an_object(sdk):
    prose = sdk.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"),
                                           temperature=0, max_tokens=20).choices[0].message.content
    r = sdk.chat.completions.create(model=MODEL, messages=ask("What is the capital of France?"), temperature=0,
                                       max_tokens=60, response_format={"type": "json_object"})
    assert not prose.lstrip().startswith("{")
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"


def test_pydantic_function_tool_round_trip(sdk):
    """parse() with a required call, run the tool, pass the SDK's message back as it
    came, and get the final answer."""
    tools = [openai.pydantic_function_tool(Add)]
    messages = ask("What is 2 plus 3?")
    r = sdk.chat.completions.parse(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                      parallel_tool_calls=False, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "Add" and call.id.startswith("call_")
    args = call.function.parsed_arguments
    assert isinstance(args, Add)
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": str(args.a + args.b)}]
    answer = sdk.chat.completions.create(model=MODEL, messages=messages, tools=tools, temperature=0,
                                            max_tokens=30)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


def test_stream_helper_with_a_named_function_tool(sdk):
    with sdk.chat.completions.stream(
            model=MODEL, messages=ask("Hello!"), tools=[openai.pydantic_function_tool(Add)],
            tool_choice={"type": "function", "function": {"name": "Add"}}, temperature=0, max_tokens=60) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [e.name for e in done] == ["Add"] and isinstance(done[0].parsed_arguments, Add)
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == done[0].parsed_arguments


CONSTRAINED = [
    ({"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
     lambda text: text in ("positive", "negative", "neutral")),
    ({"structured_outputs": {"regex": r"[A-Z]{3}-[0-9]{4}"}}, lambda text: re.fullmatch(r"[A-Z]{3}-[0-9]{4}", text)),
    ({"structured_outputs": {"json": City.model_json_schema()}}, lambda text: City.model_validate_json(text)),
]
FREE = ["Tell me a joke.", "Name a color.", "What is 1+1?"]


def test_mixed_batch_constrained_rows_valid_free_rows_as_if_alone(sdk):
    def free(prompt):
        return sdk.chat.completions.create(model=MODEL, messages=ask(prompt), temperature=0,
                                              max_tokens=12).choices[0].message.content

    def constrained(extra):
        r = sdk.chat.completions.create(model=MODEL, messages=ask("Hi there!"), temperature=0, max_tokens=60,
                                           extra_body=extra)
        return r.choices[0].message.content, r.choices[0].finish_reason

    alone = [free(p) for p in FREE]
    with ThreadPoolExecutor(6) as pool:
        free_futures = [pool.submit(free, p) for p in FREE]
        constrained_futures = [pool.submit(constrained, extra) for extra, _ in CONSTRAINED]
        together = [f.result() for f in free_futures]
        outputs = [f.result() for f in constrained_futures]
    assert together == alone
    for (text, finish), (_, valid) in zip(outputs, CONSTRAINED):
        assert valid(text) and finish == "stop", text


@pytest.mark.parametrize("kwargs,param,code", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema", "invalid_json_schema"),
    ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools[0].type", "unsupported_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
     "tool_choice", "unsupported_value"),
    ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "modalities", "unsupported_value"),
    ({"prediction": {"type": "content", "content": "Paris"}}, "prediction", "unsupported_parameter"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json", "unsupported_parameter"),
])
def test_what_is_not_served_is_a_400_naming_it(sdk, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=MODEL, messages=ask("Hi"), max_tokens=5, **kwargs)
    assert (e.value.body["param"], e.value.body["code"]) == (param, code)
