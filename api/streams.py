"""Resumable SSE streams: the record a client resumes from, the event ids it resumes
with, and how a disconnect relates to cancellation.

Every streamed text response has a record (``keys.stream(id)``): its owner, its request
ids and reply channel, and what its chunks need (``render``), so any API process can
replay it from the requests' output logs. Every SSE event carries an ``id:``: the
number of tokens each choice has streamed once that event is read (``"17"``; with
several choices or prompts, one number each: ``"17.12.0"``), ``usage`` for the usage
chunk and ``done`` for ``[DONE]``. ``GET /v1/chat/completions/{id}/stream`` (or
``/v1/completions/{id}/stream``) with ``Last-Event-ID`` (or ``?after=``) sends what
follows that event, then ``[DONE]``.

Disconnect and cancellation: a client that drops a stream before ``[DONE]`` leaves its
request generating for ``INFERSTACK_STREAM_GRACE_S``. Whoever resumes it within that
time takes it over; when nobody does, the request is cancelled at the end of the grace
period (dequeued, or dropped at its worker's next step), exactly as an immediate
disconnect-cancel but later. The record counts attached readers and numbers each
attach, so a cancel happens only when no reader came back since the last one left.
A finished stream stays resumable for ``INFERSTACK_OUTPUT_LOG_TTL_S``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import orjson

from api.errors import OpenAIError
from broker import keys

KEEPALIVE_S = 20.0
"""How often an attached reader renews its record's TTL."""
LIVE_TTL_S = 60
"""The TTL a reader renews: a record whose every reader vanished (its API process died)
lasts this long, enough for the client to resume elsewhere."""

USAGE_ID, DONE_ID, ERROR_ID = "usage", "done", "error"


@dataclass(frozen=True, slots=True)
class StreamRecord:
    id: str
    """The response id (``chatcmpl-...``, ``cmpl-...``)."""
    kind: str
    """``chat`` or ``completion``: which endpoint resumes it."""
    user: str
    model: str
    """Registry name: the output logs' hash tag."""
    tier: str
    request_ids: list[str]
    """One per prompt (several for a multi-prompt completion)."""
    n: int
    reply_to: str
    """The reply channel of the API process that admitted it (its workers publish there)."""
    render: dict = field(default_factory=dict)
    """What the endpoint's chunk renderer needs (created, model, usage option, ...)."""

    @property
    def streams(self) -> int:
        """Token streams in the response: choices times prompts."""
        return self.n * len(self.request_ids)


# -- event ids -----------------------------------------------------------------------


def event_id(progress: list[int]) -> str:
    return ".".join(map(str, progress))


def parse_after(text: str | None, streams: int) -> list[int] | str | None:
    """A ``Last-Event-ID`` (or ``?after=``): None = from the start, a progress vector,
    or ``usage``/``done``/``error``. Anything else is a 400."""
    if text is None or text == "":
        return None
    if text in (USAGE_ID, DONE_ID, ERROR_ID):
        return text
    parts = text.split(".")
    if len(parts) == streams and all(p.isdigit() for p in parts):
        return [int(p) for p in parts]
    raise OpenAIError(400, f"Invalid event id {text!r}: expected the `id` of an event of this stream "
                      f"({streams} dot-separated token counts, `usage` or `done`).", param="Last-Event-ID",
                      code="invalid_event_id")


def not_found(stream_id: str) -> OpenAIError:
    return OpenAIError(404, f"No resumable stream with id '{stream_id}' (it never existed, belongs to another "
                       "user, was cancelled, or ended too long ago).", type="not_found_error", param="id",
                       code="stream_not_found")


# -- the record ------------------------------------------------------------------------

# Attach one more reader, unless the stream was cancelled (or never existed).
# KEYS[1] = record; ARGV: ttl. Returns the attach number, or 0.
_ATTACH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'cancelled' then return 0 end
redis.call('HINCRBY', KEYS[1], 'readers', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1], 'GT')
return redis.call('HINCRBY', KEYS[1], 'attach', 1)
"""
# A reader left before the end. ARGV: ttl (grace + LIVE_TTL_S). Returns the attach number now.
_DETACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[1], 'readers', -1)
if redis.call('HGET', KEYS[1], 'state') == 'live' then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return tonumber(redis.call('HGET', KEYS[1], 'attach'))
"""
# The grace period is over: cancel if nobody came back since attach number ARGV[1]
# (and no reader saw the end meanwhile).
# ARGV: attach number, ttl after the end. Returns 1 if the caller must cancel.
_ABANDON = """
local f = redis.call('HMGET', KEYS[1], 'readers', 'attach', 'state')
if f[3] ~= 'live' or tonumber(f[1]) > 0 or f[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class StreamStore:
    def __init__(self, redis, grace_s: float, ended_ttl_s: int):
        self.r = redis
        self.grace_s = grace_s
        self.ended_ttl_s = ended_ttl_s
        self._attach = redis.register_script(_ATTACH)
        self._detach = redis.register_script(_DETACH)
        self._abandon = redis.register_script(_ABANDON)

    async def create(self, rec: StreamRecord) -> None:
        """The first reader: the client that sent the request."""
        key = keys.stream(rec.id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={"spec": orjson.dumps(asdict(rec)), "user": rec.user, "readers": 1, "attach": 1,
                                "state": "live"})
        pipe.expire(key, LIVE_TTL_S)
        await pipe.execute()

    async def discard(self, stream_id: str) -> None:
        """Admission refused: nothing to resume."""
        await self.r.delete(keys.stream(stream_id))

    async def load(self, stream_id: str) -> StreamRecord | None:
        spec = await self.r.hget(keys.stream(stream_id), "spec")
        return None if spec is None else StreamRecord(**orjson.loads(spec))

    async def attach(self, stream_id: str) -> int:
        """Another reader (a resuming client); 0 when the stream is gone or cancelled."""
        return int(await self._attach(keys=[keys.stream(stream_id)], args=[LIVE_TTL_S]))

    async def keepalive(self, stream_id: str) -> None:
        await self.r.expire(keys.stream(stream_id), LIVE_TTL_S, gt=True)

    async def ended(self, stream_id: str) -> None:
        """Every request of the stream has ended: resumable as long as the logs are kept."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.stream(stream_id), "state", "ended")
        pipe.expire(keys.stream(stream_id), self.ended_ttl_s)
        await pipe.execute()

    async def detach(self, stream_id: str) -> int:
        """A reader left early; returns the attach number to give to :meth:`abandon`."""
        return int(await self._detach(keys=[keys.stream(stream_id)], args=[int(self.grace_s) + LIVE_TTL_S]))

    async def abandon(self, stream_id: str, attach_no: int) -> bool:
        """After the grace period: True (and no attach is possible any more) when
        nobody came back, so the caller cancels the requests."""
        return bool(await self._abandon(keys=[keys.stream(stream_id)], args=[attach_no, self.ended_ttl_s]))
