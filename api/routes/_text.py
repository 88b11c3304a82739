"""What chat and completions share: identity, sampling parameters, length checks,
admission, and running one or more generations for one HTTP request."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
from fastapi import Request
from sse_starlette import EventSourceResponse

from api.auth import Identity
from api.body import parse
from api.catalog import TextModel
from api.errors import OpenAIError
from api.generation import Generation, merged, watch_disconnect
from api.schemas import _Sampling
from api.state import AppState
from api.workers import check_servable
from broker.messages import GenerateRequest, SamplingParams, TokenEvent, VisionRequest
from broker.prefix import prefix_hashes

log = logging.getLogger(__name__)
_background: set[asyncio.Task] = set()
B = TypeVar("B", bound=_Sampling)


def state_of(request: Request) -> AppState:
    return request.app.state.inferstack


async def key_gate(request: Request) -> None:
    """App-wide dependency: with keys, every route needs a valid one, checked before
    anything else (its body included), except liveness and a result file fetched
    with its own token (a presigned URL)."""
    route = request.scope.get("route")
    name = getattr(route, "name", "")
    if name == "health" or (name == "job_content" and request.query_params.get("token")):
        return
    state = state_of(request)
    if not state.keys.open and not is_admin_key(request, state):
        state.keys.identify(request.headers.get("authorization"), None)


def bearer(request: Request) -> str:
    auth = request.headers.get("authorization")
    return auth[7:].strip() if auth and auth.lower().startswith("bearer ") else ""


def is_admin_key(request: Request, state: AppState) -> bool:
    """The request carries ``INFERSTACK_ADMIN_KEY``."""
    admin_key = state.settings.admin_key
    return bool(admin_key) and hmac.compare_digest(bearer(request).encode(), admin_key.encode())


async def read(request: Request, model: type[B]) -> tuple[B, Identity]:
    """The parsed body and the caller (the key was checked before: ``key_gate``; in
    open mode the body's ``user`` names the caller)."""
    body = await parse(request, model)
    return body, state_of(request).keys.identify(request.headers.get("authorization"), body.user)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def max_tokens_for(model: TextModel, prompt_len: int, requested: int | None, default: int, where: str) -> int:
    ctx = model.context_length
    if requested is None:
        room = ctx - prompt_len
        if room < 1:
            raise context_error(model, prompt_len, 1, where)
        return min(default, room)
    if prompt_len + requested > ctx:
        raise context_error(model, prompt_len, requested, where)
    return requested


def context_error(model: TextModel, prompt_len: int, completion: int, where: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"This model's maximum context length is {model.context_length} tokens. However, you requested "
        f"{prompt_len + completion} tokens ({prompt_len} in the {where}, {completion} in the completion). "
        "Please reduce the length of the input or of max_tokens.",
        param="messages" if where == "messages" else "prompt", code="context_length_exceeded",
    )


def sampling_params(body: _Sampling, max_tokens: int, *, n: int, logprobs: bool, top_logprobs: int,
                    vocab_size: int, defaults: Mapping[str, float],
                    eos_token_ids: frozenset[int] = frozenset()) -> SamplingParams:
    """The request's sampling, with the model's recommended ``defaults`` (registry) for
    whatever it leaves unset. Counts and ranges were checked by ``api.limits``."""
    stop_ids = set(body.stop_token_ids or ())
    if any(t >= vocab_size for t in stop_ids):
        raise OpenAIError(400, f"stop_token_ids must be in [0, {vocab_size}).", param="stop_token_ids",
                          code="invalid_value")
    if body.min_tokens and len(stop_ids | eos_token_ids) >= vocab_size:
        raise OpenAIError(400, "stop_token_ids and the end-of-sequence token cover the whole vocabulary, so with "
                          "min_tokens > 0 no token could be sampled.", param="stop_token_ids", code="invalid_value")
    if any(not (k.isascii() and k.isdigit() and len(k) < 20 and int(k) < vocab_size) for k in body.logit_bias or ()):
        raise OpenAIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}).", param="logit_bias",
                          code="invalid_value")

    def pick(name: str, fallback):
        value = getattr(body, name)
        if name in defaults and (value is None or name not in body.model_fields_set):
            return defaults[name]
        return fallback if value is None else value

    top_k = pick("top_k", 0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature", 1.0),
        top_p=pick("top_p", 1.0),
        top_k=top_k if 0 < top_k < vocab_size else 0,  # k >= vocab keeps every token: the same as off
        min_p=pick("min_p", 0.0),
        seed=body.seed,
        stop=tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        n=n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=pick("presence_penalty", 0.0),
        frequency_penalty=pick("frequency_penalty", 0.0),
        repetition_penalty=pick("repetition_penalty", 1.0),
        ignore_eos=body.ignore_eos,
        min_tokens=min(body.min_tokens, max_tokens),
        skip_special_tokens=body.skip_special_tokens,
    )


def session_key(user: str, session_id: str | None) -> str | None:
    """Sessions are scoped to their user: the same id from another user is another
    session. The user is length-prefixed, so no (user, session) pair can spell another."""
    if not session_id:
        return None
    user_bytes = user.encode()
    return hashlib.sha256(len(user_bytes).to_bytes(8, "big") + user_bytes + session_id.encode()).hexdigest()[:32]


@dataclass
class TextJob:
    """One HTTP request's worth of generations (several for multi-prompt completions)."""

    state: AppState
    identity: Identity
    body: _Sampling
    session_id: str | None = None
    """Body field ``session_id`` or header ``X-Session-Id``."""
    gens: list[Generation] = field(default_factory=list)

    def add(self, request_id: str, model: TextModel, prompt_ids: list[int], params: SamplingParams,
            reasoning: bool = False, images: list[str] | None = None) -> None:
        tier = self.identity.with_priority(self.body.priority)
        kind, extra = (VisionRequest, {"images": images}) if images else (GenerateRequest, {})
        req = kind(
            id=request_id, model=model.spec.name, prompt_token_ids=prompt_ids, params=params,
            reply_to=self.state.relay.channel_for(model.spec.name), user=self.identity.user, tier=tier,
            created_at=time.time(),
            session_key=session_key(self.identity.user, self.session_id or self.body.session_id),
            cache_scope=self.identity.scope, prefix_hashes=prefix_hashes(prompt_ids, self.identity.scope),
            reasoning=reasoning, **extra,
        )
        self.gens.append(Generation(self.state, req, weight=self.identity.weight,
                                    deadline_s=self.body.deadline_s, user_cap=self.identity.max_queued))

    async def admit(self) -> None:
        for spec in {g.req.model: self.state.catalog.spec(g.req.model) for g in self.gens}.values():
            await check_servable(self.state.redis, spec)
        admitted = []
        try:
            for g in self.gens:
                await g.admit()
                admitted.append(g)
        except BaseException:
            for g in admitted:  # all or nothing for multi-prompt requests
                await g.cancel()
                g.close()
            raise

    def close(self) -> None:
        for g in self.gens:
            g.close()

    def cancel_in_background(self) -> None:
        for g in self.gens:
            if not g.done:
                task = asyncio.create_task(g.cancel())
                _background.add(task)
                task.add_done_callback(_background.discard)


async def _race_disconnect(request: Request, job: TextJob, awaitable):
    """Await ``awaitable`` unless the client hangs up first (then cancel the work)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.create_task(watch_disconnect(request, job.gens))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        raise OpenAIError(499, "Client closed the request.", code="client_closed_request")
    finally:
        watcher.cancel()


async def collect(request: Request, job: TextJob) -> list[tuple[int, TokenEvent]]:
    async def _all():
        return [item async for item in merged(job.gens)]

    try:
        return await _race_disconnect(request, job, _all())
    finally:
        job.close()


async def stream(request: Request, job: TextJob, render: Callable[[int, TokenEvent], list[dict]],
                 finish: Callable[[], list[dict]]) -> EventSourceResponse:
    """Wait for the first event (so errors before it are real HTTP errors), then stream."""
    events = merged(job.gens)
    try:
        first = await _race_disconnect(request, job, anext(events))
    except BaseException:
        job.close()
        raise

    async def sse() -> AsyncIterator[bytes]:
        complete = False
        try:
            for chunk in render(*first):
                yield sse_data(chunk)
            try:
                async for item in events:
                    for chunk in render(*item):
                        yield sse_data(chunk)
            except OpenAIError as exc:  # failed mid-stream: the status line is long gone
                yield sse_data(exc.body())
                complete = True
                return
            except Exception:  # noqa: BLE001 - never end a stream silently, whatever went wrong
                log.exception("stream of %s failed", [g.req.id for g in job.gens])
                yield sse_data(OpenAIError(500, "The stream failed on the server; retry the request.",
                                           type="server_error", code="stream_failed").body())
                return
            for chunk in finish():
                yield sse_data(chunk)
            yield b"data: [DONE]\n\n"
            complete = True
        finally:
            if not complete:
                job.cancel_in_background()
            job.close()

    return EventSourceResponse(sse(), ping=15, sep="\n")


def sse_data(payload: dict) -> bytes:
    """One server-sent event, encoded once here (sse-starlette passes bytes through)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
