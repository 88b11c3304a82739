"""Structured output: a request's :class:`~broker.messages.Constraint` as an xgrammar
grammar. Tokenizer-free, so the API builds it to reject a bad schema with a 400 before
anything is enqueued, and the worker builds the same grammar to compile it against its
tokenizer (``gpu_worker.text.grammar``).

Grammars are compact on purpose: small models under a grammar that allows free
whitespace between JSON tokens loop on whitespace until ``max_tokens``, so JSON is
single-line with ``", "`` and ``": "`` separators. ``json_object`` means an object,
not any JSON value (xgrammar's built-in JSON grammar also allows ``[true]``).

On reasoning models the constraint applies after the reasoning: the grammar starts
with an optional ``<think>...</think>`` block of free text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from broker.messages import Constraint
from inferstack.text import THINK_CLOSE, THINK_OPEN

KINDS = ("json_object", "json_schema", "regex", "ebnf", "structural_tag")


class ConstraintError(ValueError):
    """The constraint cannot be turned into a grammar; the message says why."""


def _xgr():
    import xgrammar

    return xgrammar


def warm() -> None:
    """Import what building a grammar needs (seconds, once), before a request needs it."""
    import jsonschema  # noqa: F401

    _xgr()


def _reason(exc: Exception) -> str:
    # xgrammar's C++ errors read "[10:48:15] /project/cpp/json_schema_converter.cc:5082: <reason>"
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())


def check_json_schema(schema: Any) -> None:
    """A JSON schema must be an object valid against its metaschema (draft 2020-12
    unless it names another with ``$schema``)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ConstraintError("the schema must be a JSON object")
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ConstraintError(f"{exc.message}" + (f" (at {where})" if where else "")) from None


def json_grammar(schema: dict | None, strict: bool = True):
    """Compact JSON for ``schema``; None = any JSON object. ``strict``: no properties
    beyond those the schema lists (OpenAI's strict mode); else JSON Schema's own rules
    (``additionalProperties`` defaults to allowed)."""
    xgr = _xgr()
    if schema is None:
        schema, strict = {"type": "object"}, False
    else:
        check_json_schema(schema)
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
    except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with the reason
        raise ConstraintError(_reason(exc)) from None


def choice_ebnf(choices: list[str]) -> str:
    """A grammar matching exactly one of ``choices``."""
    if not choices:
        raise ConstraintError("choice must list at least one string")
    return "root ::= " + " | ".join(_ebnf_string(c) for c in choices)


def _ebnf_string(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if 0x20 <= code < 0x7F and ch not in '"\\':
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _body_format(c: Constraint):
    """The constraint as a structural-tag format (to put after a reasoning block)."""
    from xgrammar import structural_tag as st

    if c.kind == "regex":
        return st.RegexFormat(pattern=c.spec)
    if c.kind == "structural_tag":
        return st.StructuralTag.model_validate_json(c.spec).format
    if c.kind == "ebnf":
        return st.GrammarFormat(grammar=c.spec)
    return st.GrammarFormat(grammar=str(_plain_grammar(c)))


def _plain_grammar(c: Constraint):
    xgr = _xgr()
    if c.kind == "json_object":
        return json_grammar(None)
    if c.kind == "json_schema":
        try:
            schema = json.loads(c.spec)
        except json.JSONDecodeError as exc:
            raise ConstraintError(f"the schema is not valid JSON: {exc}") from None
        return json_grammar(schema, strict=c.strict)
    if c.kind == "regex":
        return xgr.Grammar.from_regex(c.spec)
    if c.kind == "ebnf":
        return xgr.Grammar.from_ebnf(c.spec)
    if c.kind == "structural_tag":
        return xgr.Grammar.from_structural_tag(c.spec)
    raise ConstraintError(f"unknown constraint kind {c.kind!r} (known: {', '.join(KINDS)})")


def build_grammar(c: Constraint, reasoning: bool = False):
    """The xgrammar ``Grammar`` for ``c``; raises :class:`ConstraintError` with the reason."""
    try:
        if not reasoning:
            return _plain_grammar(c)
        from xgrammar import structural_tag as st

        think = st.OptionalFormat(content=st.TagFormat(
            begin=THINK_OPEN, content=st.AnyTextFormat(excludes=[THINK_OPEN]), end=THINK_CLOSE))
        gap = st.GrammarFormat(grammar='root ::= "\\n"{0,2}')  # the blank line models put after </think>
        tag = st.StructuralTag(format=st.SequenceFormat(elements=[think, gap, _body_format(c)]))
        return _xgr().Grammar.from_structural_tag(tag)
    except ConstraintError:
        raise
    except Exception as exc:  # noqa: BLE001 - xgrammar's parse errors carry the reason
        raise ConstraintError(_reason(exc)) from None
