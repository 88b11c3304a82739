"""A chat or completion request's output constraint: ``response_format``, vLLM's
``structured_outputs`` and tool calling, as one :class:`~broker.messages.Constraint`
for the worker, checked here first so a bad schema is a 400 before anything is
enqueued. Building a grammar takes milliseconds (seconds for xgrammar's first import),
so it runs off the event loop (the API's offload pool), and results are cached by what
was asked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from api.catalog import TextModel
from api.errors import OpenAIError
from api.schemas import _Sampling
from api.tool_calls import PARSERS, Hermes
from broker.messages import Constraint
from inferstack.registry import Modality, ModelSpec
from inferstack.structured import ConstraintError, build_grammar, choice_ebnf

CACHE_ENTRIES = 1024


@dataclass(frozen=True)
class OutputPlan:
    constraint: Constraint | None = None
    tools: list[dict] | None = None
    """Function tools for the chat template (None: no tools in the prompt)."""
    parser: Hermes | None = None
    """Parses tool calls out of the answer (None: the answer is plain content)."""


def _answer_constraint(body: _Sampling) -> tuple[Constraint | None, str]:
    """``response_format`` / ``structured_outputs`` -> (constraint, its param name)."""
    so = body.structured_outputs
    if so is not None:
        if so.json_ is not None:
            spec = so.json_ if isinstance(so.json_, str) else json.dumps(so.json_)
            return Constraint("json_schema", spec, strict=True), "structured_outputs.json"
        if so.regex is not None:
            return Constraint("regex", so.regex), "structured_outputs.regex"
        return Constraint("ebnf", choice_ebnf(so.choice)), "structured_outputs.choice"
    rf = getattr(body, "response_format", None)
    if rf is None or rf.type == "text":
        return None, ""
    if rf.type == "json_object" or rf.json_schema.schema_ is None:
        return Constraint("json_object"), "response_format"
    return (Constraint("json_schema", json.dumps(rf.json_schema.schema_), strict=bool(rf.json_schema.strict)),
            "response_format.json_schema.schema")


@lru_cache(maxsize=CACHE_ENTRIES)
def _check(constraint: Constraint) -> str | None:
    """None if ``constraint`` builds a grammar, else why not."""
    try:
        build_grammar(constraint)
    except ConstraintError as exc:
        return str(exc)
    return None


def _invalid(param: str, reason: str, json_kind: bool) -> OpenAIError:
    if json_kind:
        return OpenAIError(400, f"Invalid schema for {param}: {reason}", param=param, code="invalid_json_schema")
    return OpenAIError(400, f"Invalid value for {param}: {reason}", param=param, code="invalid_value")


@lru_cache(maxsize=CACHE_ENTRIES)
def _tool_constraint(parser: str, tools_json: str, choice: str, parallel: bool, answer: Constraint | None):
    from xgrammar import structural_tag as st

    tools = json.loads(tools_json)
    for i, tool in enumerate(tools):  # each schema on its own, so the error names its tool
        params = tool["function"].get("parameters")
        if params is not None:
            reason = _check(Constraint("json_schema", json.dumps(params), strict=bool(tool["function"].get("strict"))))
            if reason:
                return None, (f"tools[{i}].function.parameters", reason)
    answer_fmt = None
    if answer is not None:
        answer_fmt = st.GrammarFormat(grammar=str(build_grammar(answer)))
    return PARSERS[parser].constraint(tools, choice, parallel, answer_fmt), None


def _plan(body: _Sampling, spec: ModelSpec) -> OutputPlan:
    answer, param = _answer_constraint(body)
    if answer is not None:
        reason = _check(answer)
        if reason:
            raise _invalid(param, reason, answer.kind.startswith("json"))
    tools = getattr(body, "tools", None)
    choice = getattr(body, "tool_choice", None)
    if not tools or choice == "none":
        return OutputPlan(answer)
    if not spec.tool_parser:
        raise OpenAIError(400, f"`{spec.name}` does not support tool calling (no tool_parser in the registry).",
                          param="tools", code="unsupported_parameter")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise OpenAIError(400, "Function names in tools must be unique.", param="tools", code="invalid_value")
    choice = choice or "auto"
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise OpenAIError(400, f"tool_choice names the function '{choice.function.name}', which is not in tools.",
                              param="tool_choice", code="invalid_value")
        choice = choice.function.name
    tool_dicts = [t.model_dump(exclude_none=True, include={"type", "function"}) for t in tools]
    parallel = body.parallel_tool_calls is not False
    constraint, error = _tool_constraint(spec.tool_parser, json.dumps(tool_dicts), choice, parallel,
                                         answer if choice == "auto" else None)
    if error:
        raise _invalid(*error, json_kind=True)
    return OutputPlan(constraint, tool_dicts, PARSERS[spec.tool_parser])


def _asked_for(body: _Sampling) -> str | None:
    """The first field that asks for a constraint or tools, if any."""
    if body.structured_outputs is not None:
        return "structured_outputs"
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type != "text":
        return "response_format"
    return "tools" if getattr(body, "tools", None) else None


async def output_plan(body: _Sampling, model: TextModel) -> OutputPlan:
    """What the output must match and how tool calls are read back; a 400 if the
    request's schemas, regex or tools cannot be used. Built on the API's offload pool."""
    spec = model.spec
    field = _asked_for(body)
    if field is None:
        return OutputPlan()  # the common case never leaves the event loop
    if spec.modality is Modality.VISION:
        raise OpenAIError(400, f"{field} is not supported with vision models yet.", param=field,
                          code="unsupported_parameter")
    return await model.offload(_plan, body, spec)

