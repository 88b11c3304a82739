"""Constraints as grammars (inferstack.structured), checked on text with a byte-level
vocabulary: what each grammar accepts and what it refuses."""

import json

import pytest

from broker.messages import Constraint
from inferstack.structured import ConstraintError, build_grammar, choice_ebnf


def accepts(constraint: Constraint, text: str, reasoning: bool = False) -> bool:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([chr(i) for i in range(256)]))
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(build_grammar(constraint, reasoning)),
                                 terminate_without_stop_token=True)
    return matcher.accept_string(text) and matcher.is_completed()


SCHEMA = Constraint("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                               "required": ["a"]}))


def test_json_object_means_an_object_on_one_line():
    obj = Constraint("json_object")
    assert accepts(obj, '{"k": [1, 2], "n": null}')
    assert not accepts(obj, "[true]") and not accepts(obj, "42")
    assert not accepts(obj, '{\n  "k": 1\n}')  # free whitespace lets small models loop on it


def test_strict_schemas_refuse_unlisted_properties_and_lax_ones_allow_them():
    assert accepts(SCHEMA, '{"a": 1}') and not accepts(SCHEMA, '{"a": 1, "b": 2}')
    lax = Constraint("json_schema", SCHEMA.spec, strict=False)
    assert accepts(lax, '{"a": 1, "b": 2}')


def test_choice_matches_exactly_one_string_with_any_characters():
    choices = ["yes", 'say "hi"', "back\\slash", "naïve"]
    c = Constraint("ebnf", choice_ebnf(choices))
    import xgrammar as xgr

    tokens = [bytes([i]).decode("latin-1") for i in range(256)]
    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo(tokens)).compile_grammar(build_grammar(c))
    for text in choices:
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert m.accept_string(text.encode()) and m.is_completed(), text
    assert not accepts(c, "no") and not accepts(c, "yesyes")


def test_reasoning_comes_first_then_the_constraint():
    assert accepts(SCHEMA, '<think>I think {"a": "x"} <tool_call></think>\n\n{"a": 1}', reasoning=True)
    assert accepts(SCHEMA, '{"a": 1}', reasoning=True)  # the reasoning block is optional
    assert not accepts(SCHEMA, 'Sure: {"a": 1}', reasoning=True)


@pytest.mark.parametrize("constraint,reason", [
    (Constraint("json_schema", '{"type": "foo"}'), "foo"),
    (Constraint("json_schema", '{"type": "object", "required": "a"}'), "required"),
    (Constraint("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}'), "minimum greater than maximum"),
    (Constraint("json_schema", "[1]"), "JSON object"),
    (Constraint("json_schema", "{nope"), "not valid JSON"),
    (Constraint("regex", "(("), "parenthesis"),
    (Constraint("grammar", "x"), "unknown constraint kind"),
])
def test_errors_say_why(constraint, reason):
    with pytest.raises(ConstraintError, match=reason) as e:
        build_grammar(constraint)
    assert "/project/" not in str(e.value)  # xgrammar's source location is trimmed
