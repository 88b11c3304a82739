"""POST /v1/chat/completions"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from api.body import request_body
from api.errors import OpenAIError
from api.fetch import FetchPolicy
from api.limits import check_chat
from api.routes._text import (
    Chunks, TextJob, admit_and_stream, collect, max_tokens_for, new_id, read, resume, sampling_params, state_of,
    usage,
)
from api.schemas import ChatCompletionRequest, ChatMessage
from api.structured import output_plan
from api.tool_calls import PARSERS
from api.vision import vision_prompt
from broker.messages import TokenEvent
from inferstack.registry import Modality

router = APIRouter()


def chat_logprobs(records: list[dict] | None) -> dict | None:
    if not records:
        return None
    return {"content": [
        {"token": r["token"], "logprob": r["logprob"], "bytes": list(r["token"].encode()),
         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())}
                          for t in r["top_logprobs"]]}
        for r in records
    ]}


class ChatChunks(Chunks):
    object = "chat.completion.chunk"

    def __init__(self, rid: str, render: dict):
        super().__init__(rid, render)
        parser = render.get("tool_parser")
        self.parser = PARSERS[parser] if parser else None
        self.parsers: dict = {}
        """Per choice: the streaming tool-call parser (fed every event from the start,
        so a resumed stream rebuilds the same state)."""

    def render(self, _: int, ev: TokenEvent) -> list[dict]:
        self.count(ev)
        delta: dict = {}
        if ev.choice not in self.started:
            self.started.add(ev.choice)
            delta["role"] = "assistant"
        if ev.reasoning:
            delta["reasoning_content"] = ev.reasoning
        text, calls = ev.text, []
        parser = None
        if self.parser is not None:
            parser = self.parsers.setdefault(ev.choice, self.parser.stream())
            text, calls = parser.feed(ev.text, final=ev.finish_reason is not None)
        if text or "role" in delta:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        finish = ev.finish_reason
        if finish == "stop" and parser is not None and parser.calls:
            finish = "tool_calls"
        if not delta and not finish and not ev.logprobs:
            return []  # a token that completes no text yet (partial character, held-back stop)
        return self.chunk({"index": ev.choice, "delta": delta, "logprobs": chat_logprobs(ev.logprobs),
                           "finish_reason": finish})


@router.get("/v1/chat/completions/{stream_id}/stream")
async def resume_chat_completion(stream_id: str, request: Request):
    """The rest of a streamed chat completion after ``Last-Event-ID`` (``api.streams``)."""
    return await resume(request, stream_id, "chat", ChatChunks)


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Request messages as chat templates take them (Hugging Face's convention: tool
    call arguments as objects, tool results with their ``tool_call_id``)."""
    out = []
    for m in messages:
        d: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content:
            d["reasoning_content"] = m.reasoning_content
        out.append(d)
    return out


def _arguments(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    state = state_of(request)
    body, identity = await read(request, ChatCompletionRequest)
    check_chat(body, state.settings, state.sched.default_deadline_s)
    model = await state.catalog.text(body.model)
    if body.reasoning_effort is not None and not model.spec.reasoning:
        raise OpenAIError(400, f"reasoning_effort is not supported with `{body.model}` (not a reasoning model).",
                          param="reasoning_effort", code="unsupported_parameter")
    if model.spec.modality is not Modality.VISION and any(
        not isinstance(m.content, str) and m.content and any(p.type not in ("text", "refusal") for p in m.content)
        for m in body.messages
    ):
        raise OpenAIError(400, f"`{body.model}` accepts text only; image and audio parts need a vision model.",
                          param="messages", code="unsupported_content")
    images: list[str] = []
    plan = await output_plan(body, model)
    if model.spec.modality is Modality.VISION:
        prompt_ids, images = await vision_prompt(model, body.messages, cache_dir=state.catalog.cache_dir,
                                                 policy=FetchPolicy.of(state.settings))
    else:
        kwargs = {"enable_thinking": False} if body.reasoning_effort == "none" else {}
        prompt_ids = await model.render_chat(template_messages(body.messages), tools=plan.tools,
                                       tool_format=PARSERS[model.spec.tool_parser or "hermes"], **kwargs)
    max_tokens = max_tokens_for(model, len(prompt_ids), body.requested_max_tokens,
                                state.settings.default_max_tokens, "messages")
    params = sampling_params(body, max_tokens, n=body.n, logprobs=body.logprobs,
                             top_logprobs=body.top_logprobs or 0, vocab_size=len(model.tokenizer),
                             defaults=model.spec.sampling, eos_token_ids=model.eos_token_ids,
                             constraint=plan.constraint)
    rid = new_id("chatcmpl")
    created = int(time.time())
    job = TextJob(state, identity, body, session_id=request.headers.get("x-session-id"))
    job.add(rid, model, prompt_ids, params, reasoning=model.spec.reasoning and body.reasoning_effort != "none",
            images=images)
    if body.stream:
        return await admit_and_stream(request, job, rid, "chat", ChatChunks, {
            "created": created, "model": body.model, "prompt_tokens": len(prompt_ids),
            "include_usage": bool(body.stream_options and body.stream_options.include_usage),
            "service_tier": body.service_tier is not None,
            "tool_parser": model.spec.tool_parser if plan.parser is not None else None})
    await job.admit()

    base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": None}
    if body.service_tier is not None:
        base["service_tier"] = "default"
    counts = {"completion": 0, "cached": 0}
    choices = {i: {"text": [], "reasoning": [], "logprobs": [], "finish": None} for i in range(body.n)}
    for _, ev in await collect(request, job):
        c = choices[ev.choice]
        c["text"].append(ev.text)
        c["reasoning"].append(ev.reasoning)
        c["logprobs"].extend(ev.logprobs or [])
        c["finish"] = ev.finish_reason or c["finish"]
        counts["completion"] += len(ev.token_ids)
        counts["cached"] = max(counts["cached"], ev.cached_tokens)
    out_choices = []
    for i, c in choices.items():
        message: dict = {"role": "assistant", "content": "".join(c["text"])}
        finish = c["finish"]
        if plan.parser is not None:
            message["content"], calls = plan.parser.parse(message["content"])
            if calls:
                message["tool_calls"] = [call.openai() for call in calls]
                if finish == "stop":
                    finish = "tool_calls"
        if model.spec.reasoning:
            message["reasoning_content"] = "".join(c["reasoning"]) or None
        out_choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(c["logprobs"]) if body.logprobs else None,
                            "finish_reason": finish})
    return {**base, "object": "chat.completion", "choices": out_choices,
            "usage": usage(len(prompt_ids), counts["completion"], counts["cached"])}
