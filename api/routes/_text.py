"""What chat and completions share: identity, sampling parameters, length checks,
admission, and running one or more generations for one HTTP request."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import orjson
from fastapi import Request
from sse_starlette import EventSourceResponse


from api.auth import Identity
from api.body import parse
from api.catalog import TextModel
from api.errors import OpenAIError
from api import streams
from api.generation import Generation, merged
from api.schemas import _Sampling
from api.sse import event_stream
from api.state import AppState
from api.streams import DONE_ID, ERROR_ID, KEEPALIVE_S, USAGE_ID, StreamRecord, event_id, parse_after
from api.workers import check_servable
from broker.messages import Constraint, GenerateRequest, SamplingParams, Tier, TokenEvent, VisionRequest
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


def require_admin(request: Request, state: AppState) -> None:
    """Admin routes (stats, metrics, hosts and workers): the admin key, or a key with
    ``admin = true``; open only in open mode without an admin key."""
    if is_admin_key(request, state):
        return
    if not state.keys.open:
        if state.keys.identify(request.headers.get("authorization"), None).admin:  # 401 for an unknown key
            return
    elif not state.settings.admin_key:
        return  # open mode without an admin key: everything is open
    raise OpenAIError(403, "This endpoint needs an admin key (INFERSTACK_ADMIN_KEY, or `admin = true` in the "
                      "keys file).",
                      type="permission_error", code="admin_required")


async def read(request: Request, model: type[B]) -> tuple[B, Identity]:
    """The parsed body and the caller (the key was checked before: ``key_gate``; in
    open mode the body's ``user`` names the caller)."""
    body = await parse(request, model)
    return body, state_of(request).keys.identify(request.headers.get("authorization"), body.user)


def caller(request: Request) -> Identity:
    """Who asks, for requests without a body: the API key, or in open mode the
    ``user`` query parameter (the OpenAI ``user`` field of the submitting request)."""
    return state_of(request).keys.identify(request.headers.get("authorization"), request.query_params.get("user"))


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
                    eos_token_ids: frozenset[int] = frozenset(),
                    constraint: Constraint | None = None) -> SamplingParams:
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
        logit_bias=tuple(sorted((int(k), v) for k, v in (body.logit_bias or {}).items() if v)),
        constraint=constraint,
    )


def session_key(user: str, session_id: str | None) -> str | None:
    """Sessions are scoped to their user: the same id from another user is another
    session. The user is length-prefixed, so no (user, session) pair can spell another."""
    if not session_id:
        return None
    user_bytes = user.encode()
    return hashlib.sha256(len(user_bytes).to_bytes(8, "big") + user_bytes + session_id.encode()).hexdigest()[:32]


class Chunks:
    """Renders one streamed response's token events as OpenAI chunks (a subclass per
    endpoint fills in ``render``). It keeps state (roles sent, text offsets, usage
    counts), so a resumed stream builds a fresh one from the stream's record and feeds
    it every event from the start, sending only what follows the resume point."""

    object = ""
    """The chunks' ``object``."""

    def __init__(self, rid: str, render: dict):
        self.base = {"id": rid, "created": render["created"], "model": render["model"], "system_fingerprint": None}
        if render.get("service_tier"):
            self.base["service_tier"] = "default"
        self.include_usage = render["include_usage"]
        self.prompt_tokens = render["prompt_tokens"]
        self.started: set[int] = set()
        self.completion = self.cached = 0

    def render(self, prompt_index: int, ev: TokenEvent) -> list[dict]:
        raise NotImplementedError

    def count(self, ev: TokenEvent) -> None:
        self.completion += len(ev.token_ids)
        self.cached = max(self.cached, ev.cached_tokens)

    def chunk(self, choice: dict) -> list[dict]:
        out = {**self.base, "object": self.object, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return [out]

    def finish(self) -> list[dict]:
        if not self.include_usage:
            return []
        return [{**self.base, "object": self.object, "choices": [],
                 "usage": usage(self.prompt_tokens, self.completion, self.cached)}]


@dataclass
class TextJob:
    """One HTTP request's worth of generations (several for multi-prompt completions)."""

    state: AppState
    identity: Identity
    body: _Sampling | None
    """None for a resumed stream (its requests were admitted by another HTTP request)."""
    session_id: str | None = None
    """Body field ``session_id`` or header ``X-Session-Id``."""
    gens: list[Generation] = field(default_factory=list)
    record: StreamRecord | None = None
    """Set for a streamed response: what a client needs to resume it."""
    resumed: bool = False

    def add(self, request_id: str, model: TextModel, prompt_ids: list[int], params: SamplingParams,
            reasoning: bool = False, images: list[str] | None = None) -> None:
        tier = self.identity.with_priority(self.body.priority)
        kind, extra = (VisionRequest, {"images": images}) if images else (GenerateRequest, {})
        req = kind(
            id=request_id, model=model.spec.name, prompt_token_ids=prompt_ids, params=params,
            reply_to=self.state.relay.channel, user=self.identity.user, tier=tier, created_at=time.time(),
            session_key=session_key(self.identity.user, self.session_id or self.body.session_id),
            cache_scope=self.identity.scope, prefix_hashes=prefix_hashes(prompt_ids, self.identity.scope),
            reasoning=reasoning, **extra,
        )
        self.gens.append(Generation(self.state, req, weight=self.identity.weight,
                                    deadline_s=self.body.deadline_s, user_cap=self.identity.max_queued))

    def resumable(self, response_id: str, kind: str, render: dict) -> None:
        """Make this streamed response resumable (call after the last ``add``)."""
        first = self.gens[0].req
        self.record = StreamRecord(
            id=response_id, kind=kind, user=self.identity.user, model=first.model, tier=str(first.tier),
            request_ids=[g.req.id for g in self.gens], n=first.params.n, reply_to=first.reply_to, render=render)

    @classmethod
    def resume(cls, state: AppState, identity: Identity, record: StreamRecord) -> "TextJob":
        """Readers for the requests of a stream someone else admitted."""
        job = cls(state, identity, None, record=record, resumed=True)
        for rid in record.request_ids:
            req = GenerateRequest(id=rid, model=record.model, prompt_token_ids=[], params=SamplingParams(n=record.n),
                                  reply_to=record.reply_to, user=record.user, tier=Tier(record.tier))
            gen = Generation(state, req, resumed=True)
            gen.attach()
            job.gens.append(gen)
        return job

    @property
    def n(self) -> int:
        return self.gens[0].req.params.n

    async def admit(self) -> None:
        for spec in {g.req.model: self.state.catalog.spec(g.req.model) for g in self.gens}.values():
            await check_servable(self.state.redis, spec)
        if self.record is not None:
            await self.state.streams.create(self.record)
        admitted = []
        try:
            for g in self.gens:
                await g.admit()
                admitted.append(g)
        except BaseException:
            for g in admitted:  # all or nothing for multi-prompt requests
                await g.cancel()
                g.close()
            if self.record is not None:
                self._background(self.state.streams.discard(self.record.id))
            raise

    def close(self) -> None:
        for g in self.gens:
            g.close()

    async def cancel(self) -> None:
        for g in self.gens:
            await g.cancel()

    def cancel_in_background(self) -> None:
        for g in self.gens:
            if not g.done:
                self._background(g.cancel())

    def hang_up(self) -> None:
        """The client left before the end. A resumable stream goes on for the grace
        period (any API process may resume it meanwhile), then is cancelled unless
        someone did; anything else is cancelled now."""
        if self.record is None or self.state.settings.stream_grace_s <= 0 or all(g.done for g in self.gens):
            self.cancel_in_background()
            return
        for g in self.gens:
            g.detached = True
        self._background(self._grace())

    async def _grace(self) -> None:
        store = self.state.streams
        abandoned = True
        try:
            attach_no = await store.detach(self.record.id)
            if attach_no > 0:
                await asyncio.sleep(store.grace_s)
                abandoned = await store.abandon(self.record.id, attach_no)
        except Exception:  # noqa: BLE001 - Redis away: cancel as if nobody came back (best effort)
            log.warning("stream %s: could not check for a resumed reader; cancelling it", self.record.id)
        for g in self.gens:
            if abandoned:
                await g.abandon()
            else:
                g.rec.handed_over()

    def ended(self) -> None:
        """Every request of the stream has ended (or failed): resumable as long as its
        logs are kept."""
        if self.record is not None:
            self._background(self.state.streams.ended(self.record.id))

    async def keep_alive(self) -> None:
        """While a client reads the stream: keep its record from expiring."""
        if self.record is None:
            return
        while True:
            await asyncio.sleep(KEEPALIVE_S)
            try:
                await self.state.streams.keepalive(self.record.id)
            except Exception:  # noqa: BLE001 - Redis away: the record's TTL outlasts the outage limit
                pass

    @staticmethod
    def _background(coro) -> None:
        async def run():
            try:
                await coro
            except Exception:  # noqa: BLE001 - best effort
                log.exception("background stream task failed")

        task = asyncio.create_task(run())
        _background.add(task)
        task.add_done_callback(_background.discard)


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def _race_disconnect(request: Request, job: TextJob, awaitable):
    """Await ``awaitable`` unless the client hangs up first (then the work stops: a
    new request is cancelled at once, since its client never learnt its id; a resumed
    one gets the grace period)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        if job.resumed:
            job.hang_up()
        else:
            await job.cancel()
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


async def admit_and_stream(request: Request, job: TextJob, response_id: str, kind: str, chunks: type[Chunks],
                           render: dict, *, resumable: bool = True) -> EventSourceResponse:
    """A new streamed response: resumable (``render`` is what ``chunks`` needs), admitted, streamed."""
    if resumable:
        job.resumable(response_id, kind, render)
    await job.admit()
    return await stream(request, job, chunks(response_id, render))


async def stream(request: Request, job: TextJob, chunks: Chunks, after: list[int] | str | None = None
                 ) -> EventSourceResponse:
    """Wait for the first event (so errors before it are real HTTP errors), then stream.
    ``after``: the resume point (see ``api.streams``); only what follows it is sent."""
    events = _events(job, chunks, after)
    try:
        first = await _race_disconnect(request, job, anext(events))
    except BaseException:
        job.close()
        raise

    async def sse() -> AsyncIterator[bytes]:
        complete = False
        keeper = asyncio.create_task(job.keep_alive())
        try:
            yield first
            async for item in events:
                yield item
            complete = True
        finally:
            keeper.cancel()
            if not complete:
                job.hang_up()
            job.close()

    return event_stream(sse())


async def _events(job: TextJob, chunks: Chunks, after: list[int] | str | None) -> AsyncIterator[bytes]:
    """The response's server-sent events, each with its id, the usage chunk and
    ``[DONE]``; an error after the first event becomes an error event, then ``[DONE]``."""
    n = job.n
    # What the client holds, so every id it can see names all of it (replayed choices
    # catch up in any order: an id must never claim less than the resume point).
    progress = list(after) if isinstance(after, list) else [0] * (n * len(job.gens))
    sent = False
    try:
        async for i, ev in merged(job.gens):
            k = i * n + ev.choice
            progress[k] = max(progress[k], ev.start + len(ev.token_ids))
            chunks_ = chunks.render(i, ev)  # always: the renderer's state follows every event
            if isinstance(after, str) or (after is not None and ev.start + len(ev.token_ids) <= after[k]):
                continue  # the client has it already
            for chunk in chunks_:
                sent = True
                yield sse_data(chunk, event_id(progress))
    except OpenAIError as exc:
        if not sent and after is None:
            raise
        job.ended()
        yield sse_data(exc.body(), ERROR_ID)
        yield DONE
        return
    job.ended()
    if after not in (USAGE_ID, DONE_ID):
        for chunk in chunks.finish():
            yield sse_data(chunk, USAGE_ID)
    yield DONE


async def resume(request: Request, stream_id: str, kind: str, make_chunks: type[Chunks]) -> EventSourceResponse:
    """``GET /v1/{chat/completions,completions}/{id}/stream``: the rest of a stream after
    ``Last-Event-ID`` (or ``?after=``), for its owner only."""
    state = state_of(request)
    identity = caller(request)
    record = await state.streams.load(stream_id)
    if record is None or record.user != identity.user or record.kind != kind:
        raise streams.not_found(stream_id)
    after = parse_after(request.headers.get("last-event-id") or request.query_params.get("after"), record.streams)
    if not await state.streams.attach(stream_id):
        raise streams.not_found(stream_id)
    job = TextJob.resume(state, identity, record)
    return await stream(request, job, make_chunks(record.id, record.render), after)


DONE = b"id: " + DONE_ID.encode() + b"\ndata: [DONE]\n\n"
"""The last event of every text stream."""


def sse_data(payload: dict, event: str) -> bytes:
    """One server-sent event with its id, encoded once here (sse-starlette passes bytes through)."""
    return b"id: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
