"""The hermes tool-call format: prompts for templates without tool support, parsing
whole and streamed output into OpenAI tool_calls, and the grammar that forces calls."""

import json
import random

import pytest

from api.tool_calls import PARSERS, ToolCallStream

HERMES = PARSERS["hermes"]
TEXT = ('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": {"c": "}"}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now"}}]


def test_whole_output_parses_into_calls_and_content():
    content, calls = HERMES.parse(TEXT)
    assert content == "Sure."
    assert [(c.name, c.arguments) for c in calls] == [("add", '{"a": 2, "b": {"c": "}"}}'), ("now", "{}")]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert calls[0].openai()["type"] == "function"


@pytest.mark.parametrize("seed", range(50))
def test_streamed_deltas_add_up_to_the_whole_parse(seed):
    rnd = random.Random(seed)
    stream: ToolCallStream = HERMES.stream()
    content, heads, args, i = "", [], {}, 0
    while i < len(TEXT):
        n = rnd.randint(1, 6)
        text, deltas = stream.feed(TEXT[i:i + n], final=i + n >= len(TEXT))
        i += n
        content += text
        for d in deltas:
            if "id" in d:  # the first delta of a call: index, id, type and name
                assert d["type"] == "function" and d["function"]["arguments"] == ""
                heads.append((d["index"], d["function"]["name"]))
                args[d["index"]] = ""
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                args[d["index"]] += d["function"]["arguments"]
    whole_content, whole = HERMES.parse(TEXT)
    assert content == whole_content
    assert heads == [(0, "add"), (1, "now")]
    assert [args[0], args[1]] == [c.arguments for c in whole]
    assert all(json.loads(a) is not None for a in args.values())


@pytest.mark.parametrize("text,content", [
    ("no calls here  ", "no calls here"),
    ("<tool_call>\nnot json\n</tool_call> tail", "<tool_call>\nnot json\n</tool_call> tail"),
    ('<tool_call>\n{"name": "add", "argu', '<tool_call>\n{"name": "add", "argu'),  # cut before its arguments
])
def test_text_that_is_not_a_complete_call_stays_content(text, content):
    assert HERMES.parse(text) == (content, [])


def test_calls_in_another_key_order_still_parse():
    _, calls = HERMES.parse('<tool_call>\n{"arguments": {"a": 1}, "name": "add"}\n</tool_call>')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1})]


def test_fallback_puts_tools_in_the_system_message_and_history_in_hermes_form():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": "6"},
    ]
    out = HERMES.fallback_messages(messages, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "add"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n5\n</tool_response>\n<tool_response>\n6\n</tool_response>"
    assert all(set(m) <= {"role", "content", "name"} for m in out)


def test_render_chat_uses_the_template_when_it_knows_tools(tiny_model_dir):
    from transformers import AutoTokenizer

    from api.catalog import TextModel
    from inferstack.registry import Modality, ModelSpec

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = TextModel(ModelSpec(name="t", modality=Modality.TEXT), tok, 512, offload=None)
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "now", "arguments": {}}}]},
               {"role": "tool", "tool_call_id": "c", "content": "noon"}]
    fallback = tok.decode(model._render_chat(history, TOOLS, HERMES))  # what render_chat runs off the loop
    assert "# Tools" in fallback and "<tool_response>\nnoon\n</tool_response>" in fallback
    tok.chat_template = ("{% for t in tools %}TOOL:{{ t.function.name }};{% endfor %}"
                         "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                         "{% for c in m.tool_calls or [] %}CALL:{{ c.function.name }}{% endfor %}|{% endfor %}")
    native = tok.decode(model._render_chat(history, TOOLS, HERMES))
    assert native.startswith("TOOL:add;TOOL:now;") and "CALL:now" in native and "tool:noon" in native


@pytest.mark.parametrize("choice,parallel,accepts,rejects", [
    ("now", True, ['<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'],
     ["hello", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>']),
    ("required", False, ['<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'],
     ["hello", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>']),
    ("auto", True, ["hello", 'hi <tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'],
     ['<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>']),
])
def test_the_grammar_forces_well_formed_calls(choice, parallel, accepts, rejects):
    import xgrammar as xgr

    from inferstack.structured import build_grammar

    grammar = build_grammar(HERMES.constraint(TOOLS, choice, parallel))
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([chr(i) for i in range(256)])).compile_grammar(grammar)

    def matches(text):
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        return m.accept_string(text) and m.is_completed()

    assert all(matches(t) for t in accepts) and not any(matches(t) for t in rejects)
