"""POST /v1/chat/completions"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from api.body import request_body
from api.errors import OpenAIError
from api.fetch import FetchPolicy
from api.limits import check_chat
from api.routes._text import (
    TextJob, collect, max_tokens_for, new_id, read, sampling_params, state_of, stream, usage,
)
from api.schemas import ChatCompletionRequest
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


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    state = state_of(request)
    body, identity = await read(request, ChatCompletionRequest)
    check_chat(body, state.settings, state.sched.default_deadline_s)
    model = await state.catalog.text(body.model)
    if model.spec.modality is not Modality.VISION and any(
        not isinstance(m.content, str) and m.content and any(p.type != "text" for p in m.content)
        for m in body.messages
    ):
        raise OpenAIError(400, f"`{body.model}` accepts text only; image and audio parts need a vision model.",
                          param="messages", code="unsupported_content")
    images: list[str] = []
    if model.spec.modality is Modality.VISION:
        prompt_ids, images = await vision_prompt(model, body.messages, cache_dir=state.catalog.cache_dir,
                                                 policy=FetchPolicy.of(state.settings))
    else:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt_ids = await model.render_chat(messages)
    max_tokens = max_tokens_for(model, len(prompt_ids), body.requested_max_tokens,
                                state.settings.default_max_tokens, "messages")
    params = sampling_params(body, max_tokens, n=body.n, logprobs=body.logprobs,
                             top_logprobs=body.top_logprobs or 0, vocab_size=len(model.tokenizer),
                             defaults=model.spec.sampling, eos_token_ids=model.eos_token_ids)
    rid = new_id("chatcmpl")
    job = TextJob(state, identity, body, session_id=request.headers.get("x-session-id"))
    job.add(rid, model, prompt_ids, params, reasoning=model.spec.reasoning, images=images)
    await job.admit()

    created = int(time.time())
    base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": None}
    counts = {"completion": 0, "cached": 0}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        started: set[int] = set()

        def render(_: int, ev: TokenEvent) -> list[dict]:
            counts["completion"] += len(ev.token_ids)
            counts["cached"] = max(counts["cached"], ev.cached_tokens)
            delta: dict = {}
            if ev.choice not in started:
                started.add(ev.choice)
                delta["role"] = "assistant"
            if ev.reasoning:
                delta["reasoning_content"] = ev.reasoning
            if ev.text or "role" in delta:
                delta["content"] = ev.text
            if not delta and not ev.finish_reason and not ev.logprobs:
                return []  # a token that completes no text yet (partial character, held-back stop)
            chunk = {**base, "object": "chat.completion.chunk", "choices": [{
                "index": ev.choice, "delta": delta, "logprobs": chat_logprobs(ev.logprobs),
                "finish_reason": ev.finish_reason}]}
            if include_usage:
                chunk["usage"] = None
            return [chunk]

        def finish() -> list[dict]:
            if not include_usage:
                return []
            return [{**base, "object": "chat.completion.chunk", "choices": [],
                     "usage": usage(len(prompt_ids), counts["completion"], counts["cached"])}]

        return await stream(request, job, render, finish)

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
        message = {"role": "assistant", "content": "".join(c["text"])}
        if model.spec.reasoning:
            message["reasoning_content"] = "".join(c["reasoning"]) or None
        out_choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(c["logprobs"]) if body.logprobs else None,
                            "finish_reason": c["finish"]})
    return {**base, "object": "chat.completion", "choices": out_choices,
            "usage": usage(len(prompt_ids), counts["completion"], counts["cached"])}
