"""Tool calling for chat: how a model writes its calls (its tool parser, named by the
registry's ``tool_parser``), how tools and past calls reach the chat template, the
grammar that makes calls well-formed (and forces them for ``required`` or a named
function), and turning the model's text back into OpenAI ``tool_calls``, whole or
streamed.

One format today, ``hermes`` (Qwen2.5 and Qwen3 templates use it natively)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Templates without tool support (SmolLM2's) get the hermes fallback: the tools are
listed in the system message with the instructions Qwen's template uses, past calls
are written into the assistant message in the format above, and tool results go back
as a user message wrapped in ``<tool_response>``. Tool calls inside a reasoning
section are not calls: only the answer (``content``) is parsed, and the grammar
starts after the reasoning.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from broker.messages import Constraint
from inferstack.registry import TOOL_PARSERS
from inferstack.structured import json_grammar
from inferstack.text import partial_suffix


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallOut:
    """One parsed call: OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}``."""

    name: str
    arguments: str
    """JSON text, as the model wrote it."""
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class Hermes:
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    # -- prompts ------------------------------------------------------------------------

    def system_prompt(self, tools: list[dict]) -> str:
        """The tool instructions for templates without tool support."""
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{listed}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def call_text(self, name: str, arguments: str) -> str:
        return f'{self.OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n{self.CLOSE}'

    def fallback_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """Messages in the template-neutral hermes form: tools in the system message,
        calls in assistant text, results as ``<tool_response>`` user turns."""
        out: list[dict] = []
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = [self.call_text(c["function"]["name"], _arguments_text(c["function"]["arguments"]))
                         for c in m["tool_calls"]]
                out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", *calls]))})
            elif m["role"] == "tool":
                result = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
                if out and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + result
                else:
                    out.append({"role": "user", "content": result, "_tool_results": True})
            else:
                out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
        for m in out:
            m.pop("_tool_results", None)
        if tools:
            prompt = self.system_prompt(tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    # -- the grammar ----------------------------------------------------------------------

    def _call_format(self, tool: dict):
        from xgrammar import structural_tag as st

        fn = tool["function"]
        params = fn.get("parameters")
        grammar = json_grammar(params if params is not None else None, strict=bool(fn.get("strict")))
        return st.TagFormat(begin=f'{self.OPEN}\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": ',
                            content=st.GrammarFormat(grammar=str(grammar)), end=f"}}\n{self.CLOSE}")

    def constraint(self, tools: list[dict], choice: str | None, parallel: bool, answer=None) -> Constraint:
        """Calls as a structural tag: ``required`` = one or more calls (one if not
        ``parallel``); a function name = that call; ``auto`` = free text in which each
        call, once opened, is well-formed (or, with a response format, either calls or
        that ``answer`` format)."""
        from xgrammar import structural_tag as st

        if choice not in ("auto", "required"):
            fmt = self._call_format(next(t for t in tools if t["function"]["name"] == choice))
        else:
            tags = [self._call_format(t) for t in tools]
            calls = (st.TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True) if parallel
                     else st.OrFormat(elements=tags))
            if choice == "required":
                fmt = calls
            elif answer is not None:
                fmt = st.OrFormat(elements=[calls, answer])
            else:
                fmt = st.TriggeredTagsFormat(triggers=[self.OPEN], tags=tags, stop_after_first=not parallel)
        return Constraint("structural_tag", st.StructuralTag(format=fmt).model_dump_json())

    # -- parsing ----------------------------------------------------------------------------

    def parse_call(self, block: str) -> ToolCallOut | None:
        """The inside of one ``<tool_call>...</tool_call>``, or None if it is not a call."""
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
            return None
        head = self._HEAD.match(block)
        raw = _strip_close(block[head.end():]) if head else None
        if raw is None or _loads(raw) != obj["arguments"]:  # keys in another order: re-serialize
            raw = _arguments_text(obj["arguments"])
        return ToolCallOut(obj["name"], raw)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def parse(self, text: str) -> tuple[str | None, list[ToolCallOut]]:
        """Whole output -> (content, calls)."""
        stream = self.stream()
        content, _ = stream.feed(text, final=True)
        return content or None, stream.calls


class ToolCallStream:
    """Incremental parser for one choice: text in, (content delta, tool-call deltas)
    out, in OpenAI's shape: a call's first delta carries its index, id, type and name,
    later ones fragments of its arguments."""

    def __init__(self, fmt: Hermes):
        self.fmt = fmt
        self.calls: list[ToolCallOut] = []
        self._buf = ""
        self._in_call = False
        self._head_sent = False
        self._sent_args = 0
        self._held_ws = ""
        self._content_started = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self._buf += text
        content: list[str] = []
        deltas: list[dict] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self.fmt.OPEN)
                if i < 0:
                    keep = 0 if final else partial_suffix(self._buf, self.fmt.OPEN)
                    content.append(self._content(self._buf[: len(self._buf) - keep], final))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._content(self._buf[:i], False))
                self._buf = self._buf[i + len(self.fmt.OPEN):]
                self._in_call, self._head_sent, self._sent_args = True, False, 0
                continue
            j = self._buf.find(self.fmt.CLOSE)
            block = self._buf if j < 0 else self._buf[:j]
            if not self._head_sent:
                head = self.fmt._HEAD.match(block)
                if head and (j >= 0 or head.end() < len(block)):
                    name = json.loads(f'"{head.group(1)}"')
                    self.calls.append(ToolCallOut(name, ""))
                    deltas.append({"index": len(self.calls) - 1, "id": self.calls[-1].id, "type": "function",
                                   "function": {"name": name, "arguments": ""}})
                    self._buf = self._buf[head.end():]
                    self._head_sent = True
                    continue
                if j < 0 and not final:
                    break
                if j >= 0:  # not in the expected shape: take the whole block if it is a call
                    call = self.fmt.parse_call(block)
                    if call is not None:
                        self.calls.append(call)
                        deltas.append({"index": len(self.calls) - 1, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": call.arguments}})
                    else:
                        content.append(self._content(self.fmt.OPEN + block + self.fmt.CLOSE, False))
                    self._buf = self._buf[j + len(self.fmt.CLOSE):]
                    self._in_call = False
                    continue
                content.append(self._content(self.fmt.OPEN + self._buf, True))  # cut off before its name
                self._buf, self._in_call = "", False
                break
            if j >= 0:
                args = _strip_close(block)
            elif final:
                args = block  # cut off (max_tokens): what there is
            else:
                safe = block[: len(block) - partial_suffix(block, self.fmt.CLOSE)]
                args = _strip_close(safe)
            piece = args[self._sent_args:]
            if piece:
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})
                self.calls[-1].arguments += piece
                self._sent_args = len(args)
            if j < 0:
                if final:
                    self._buf, self._in_call = "", False
                break
            self._buf = self._buf[j + len(self.fmt.CLOSE):]
            self._in_call = False
        return "".join(content), deltas

    def _content(self, text: str, final: bool) -> str:
        """Content outside calls, trimmed as a whole (so streamed and unstreamed content
        agree): leading whitespace dropped, whitespace held until text follows it."""
        text = self._held_ws + text
        if not self._content_started:
            text = text.lstrip()
        body = text.rstrip()
        self._held_ws = "" if final else text[len(body):]
        if body:
            self._content_started = True
        return body


def _strip_close(block: str) -> str:
    """The arguments inside ``{"name": ..., "arguments": ARGS}``: drop the outer ``}``."""
    body = block.rstrip()
    if body.endswith("}"):
        body = body[:-1]
    return body.rstrip()


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


PARSERS = {"hermes": Hermes()}
assert set(PARSERS) == TOOL_PARSERS, "every parser the registry accepts is implemented here"
