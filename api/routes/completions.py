"""POST /v1/completions"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from api.body import request_body
from api.errors import OpenAIError
from api.limits import check_completion
from api.routes._text import (
    Chunks, TextJob, admit_and_stream, collect, context_error, max_tokens_for, new_id, read, resume, sampling_params,
    state_of, usage,
)
from api.schemas import CompletionRequest
from api.structured import output_plan
from broker.messages import TokenEvent

router = APIRouter()

MAX_RECORDED_ECHO_CHARS = 65536
"""Echoed prompt text a resumable stream's record may hold (Redis memory stays bounded)."""


async def _prompts(model, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    texts = [p for p in prompt if isinstance(p, str)]
    encoded = iter(await model.encode(texts) if texts else ())
    return [next(encoded) if isinstance(p, str) else list(p) for p in prompt]


def completion_logprobs(records: list[dict], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for r in records:
        tokens.append(r["token"])
        lps.append(r["logprob"])
        tops.append({t["token"]: t["logprob"] for t in r["top_logprobs"]})
        offsets.append(offset)
        offset += len(r["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class CompletionChunks(Chunks):
    object = "text_completion"

    def __init__(self, rid: str, render: dict):
        super().__init__(rid, render)
        self.n, self.echo = render["n"], render["echo"]
        self.offsets: dict[int, int] = {}

    def render(self, prompt_index: int, ev: TokenEvent) -> list[dict]:
        self.count(ev)
        index = prompt_index * self.n + ev.choice
        text = ev.text
        if index not in self.started:
            self.started.add(index)
            text = self.echo[prompt_index] + text
        if not text and not ev.finish_reason and not ev.logprobs:
            return []
        lp = None
        if ev.logprobs:
            lp = completion_logprobs(ev.logprobs, self.offsets.get(index, len(self.echo[prompt_index])))
            self.offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        return self.chunk({"index": index, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason})


@router.get("/v1/completions/{stream_id}/stream")
async def resume_completion(stream_id: str, request: Request):
    """The rest of a streamed completion after ``Last-Event-ID`` (``api.streams``)."""
    return await resume(request, stream_id, "completion", CompletionChunks)


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
async def completions(request: Request):
    state = state_of(request)
    body, identity = await read(request, CompletionRequest)
    check_completion(body, state.settings, state.sched.default_deadline_s)
    model = await state.catalog.text(body.model)
    plan = await output_plan(body, model)
    prompts = await _prompts(model, body.prompt)
    if any(not p for p in prompts):
        raise OpenAIError(400, "prompt must not be empty.", param="prompt", code="invalid_value")
    for ids in prompts:  # before looking at every token id of a long one
        if len(ids) >= model.context_length:
            raise context_error(model, len(ids), 1, "prompt")
    vocab = len(model.tokenizer)
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise OpenAIError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt", code="invalid_value")
    rid = new_id("cmpl")
    job = TextJob(state, identity, body, session_id=request.headers.get("x-session-id"))
    for i, ids in enumerate(prompts):
        max_tokens = max_tokens_for(model, len(ids), body.requested_max_tokens, state.settings.default_max_tokens,
                                    "prompt")
        params = sampling_params(body, max_tokens, n=body.n, logprobs=body.logprobs is not None,
                                 top_logprobs=body.logprobs or 0, vocab_size=len(model.tokenizer),
                                 defaults=model.spec.sampling, eos_token_ids=model.eos_token_ids,
                                 constraint=plan.constraint)
        job.add(rid if len(prompts) == 1 else f"{rid}-{i}", model, ids, params)
    created = int(time.time())
    n = body.n
    prompt_tokens = sum(len(p) for p in prompts)
    echo = await state.offload(lambda: [model.decode(p) for p in prompts]) if body.echo else [""] * len(prompts)
    if body.stream:
        # The echoed prompts ride in the stream's record; past a bound the stream is not resumable.
        return await admit_and_stream(request, job, rid, "completion", CompletionChunks, {
            "created": created, "model": body.model, "prompt_tokens": prompt_tokens, "n": n, "echo": echo,
            "include_usage": bool(body.stream_options and body.stream_options.include_usage)},
            resumable=sum(map(len, echo)) <= MAX_RECORDED_ECHO_CHARS)
    await job.admit()

    base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": None}
    counts = {"completion": 0, "cached": 0}
    choices: dict[int, dict] = {
        p * n + c: {"text": [echo[p]], "logprobs": [], "finish": None, "echo": len(echo[p])}
        for p in range(len(prompts)) for c in range(n)
    }
    for prompt_index, ev in await collect(request, job):
        c = choices[prompt_index * n + ev.choice]
        c["text"].append(ev.text)
        c["logprobs"].extend(ev.logprobs or [])
        c["finish"] = ev.finish_reason or c["finish"]
        counts["completion"] += len(ev.token_ids)
        counts["cached"] = max(counts["cached"], ev.cached_tokens)
    return {**base, "object": "text_completion", "choices": [
        {"index": i, "text": "".join(c["text"]), "finish_reason": c["finish"],
         "logprobs": completion_logprobs(c["logprobs"], c["echo"]) if body.logprobs is not None else None}
        for i, c in sorted(choices.items())
    ], "usage": usage(prompt_tokens, counts["completion"], counts["cached"])}
