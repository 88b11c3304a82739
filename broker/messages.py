"""Wire messages between the API and the workers, one small dataclass each.

Grouped by who receives them:

* API -> worker (through the scheduler's queue): :class:`GenerateRequest`.
* worker -> API (through the API process's reply channel): :class:`TokenEvent`,
  :class:`ErrorEvent`; a worker publishes one JSON list of events per API process
  per engine step.
* API -> workers (cancel channel): the bare request id.
* API -> worker (fair queue) :class:`SpeechRequest`; worker -> API: :class:`AudioChunk`.
* API -> workers (rq job argument): :class:`MediaRequest`; worker -> API (reply
  channel) when the job ends: :class:`JobEvent`.
* admin API -> a host supervisor (its command list): :class:`ModeChange`.

JSON keeps the wire readable with ``redis-cli MONITOR``; each message is a pair
``[tag, fields]``, the tag naming its type.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson


class Tier(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Higher is more important."""
        return {"high": 2, "normal": 1, "low": 0}[self.value]


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a request's output must match, enforced by constrained decoding
    (``inferstack.structured`` turns it into a grammar)."""

    kind: str
    """``json_object`` (any JSON object), ``json_schema``, ``regex``, ``ebnf`` or
    ``structural_tag`` (xgrammar's format, as tool calls use it)."""
    spec: str = ""
    """The schema or structural tag as JSON text, the regex or the grammar."""
    strict: bool = True
    """``json_schema`` only: no object properties beyond those the schema lists
    (OpenAI's ``strict``); False follows JSON Schema (extra properties allowed)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit), OpenAI's ``logit_bias``."""
    constraint: Constraint | None = None
    """Structured output (response_format, structured_outputs, forced tool calls)."""

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow to inf: it is argmax in all but name.
        return self.temperature < 1e-5


@dataclass(slots=True)
class GenerateRequest:
    """One admitted text request, as it waits in the queue and as a worker claims it."""

    id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    reply_to: str
    """Pub/sub channel of the API process that holds the client connection."""
    user: str = "anonymous"
    tier: Tier = Tier.NORMAL
    created_at: float = 0.0
    deadline: float = 0.0
    """Unix time by which the request must have started; after that it fails, never runs late."""
    session_key: str | None = None
    """The user-scoped session key (a hash of user and session id): a session's KV cache
    is only ever reused within that user's session."""
    cache_scope: str = ""
    """Who may share prompt-prefix KV caches with this request (the key's ``cache_scope``,
    by default its user); ``prefix_hashes`` are computed within it."""
    prefix_hashes: list[str] = field(default_factory=list)
    """Chained hashes of the prompt's whole token blocks (broker.prefix)."""
    reasoning: bool = False
    """Split ``<think>...</think>`` into ``reasoning_content`` (chat on reasoning models)."""
    trace: dict[str, str] = field(default_factory=dict)
    """W3C trace context carrier, so the worker's spans join the API's trace."""

    @property
    def cost(self) -> int:
        """Scheduling cost in tokens: what the request can make the GPU do at most."""
        return len(self.prompt_token_ids) + self.params.max_tokens * self.params.n

    @property
    def seqs(self) -> int:
        """Batch rows it takes (one per choice): what a worker's claim counts."""
        return self.params.n


@dataclass(slots=True)
class VisionRequest(GenerateRequest):
    """A chat request with images (vision-language models). ``prompt_token_ids`` already
    hold one image-pad token per vision token, so cost and context checks are exact."""

    images: list[str] = field(default_factory=list)
    """Base64 PNG of each image, in prompt order."""


@dataclass(slots=True)
class TokenEvent:
    """New output of one choice of one request, produced by one engine step."""

    request_id: str
    choice: int
    start: int
    """Index in the choice's output of the first token carried here; lets the API drop
    events it has already relayed when a request resumes on another worker."""
    token_ids: list[int]
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    cached_tokens: int = 0
    """Prompt tokens served from a KV cache instead of prefilled (sent with the first event)."""


@dataclass(slots=True)
class ErrorEvent:
    """The request failed; the API turns this into an OpenAI-shaped error."""

    request_id: str
    message: str
    type: str = "server_error"
    code: str | None = None
    status: int = 500


# -- speech ------------------------------------------------------------------------


@dataclass(slots=True)
class SpeechRequest:
    """One admitted text-to-speech request (fair queue, like text)."""

    id: str
    model: str
    input: str
    voice: str
    reply_to: str
    speed: float = 1.0
    user: str = "anonymous"
    tier: Tier = Tier.NORMAL
    created_at: float = 0.0
    deadline: float = 0.0
    trace: dict[str, str] = field(default_factory=dict)
    session_key: str | None = None
    prefix_hashes: list[str] = field(default_factory=list)
    """Always empty: speech has no KV cache to route to (the fair queue's enqueue reads them)."""

    @property
    def cost(self) -> int:
        """Scheduling cost: characters to speak (synthesis time grows with them)."""
        return len(self.input)

    @property
    def seqs(self) -> int:
        return 1


@dataclass(slots=True)
class AudioChunk:
    """The next piece of a speech request's audio: 16-bit little-endian mono PCM."""

    request_id: str
    index: int
    """Chunk number; lets the API drop repeats after a resume on another worker."""
    sample_rate: int
    pcm: str
    """Base64 of the PCM bytes."""
    final: bool = False


# -- media -------------------------------------------------------------------------


@dataclass(slots=True)
class MediaRequest:
    """One image or video generation job: the argument of its rq job."""

    id: str
    model: str
    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    width: int = 512
    height: int = 512
    steps: int | None = None
    """Denoising steps; None = the model's default (registry ``steps``)."""
    guidance_scale: float | None = None
    seed: int | None = None
    num_frames: int | None = None
    """Video only."""
    fps: int = 8
    response_format: str = "b64_json"
    user: str = "anonymous"
    tier: Tier = Tier.NORMAL
    reply_to: str = ""
    """Reply channel of the API process waiting synchronously, or empty."""
    created_at: float = 0.0


@dataclass(slots=True)
class JobEvent:
    """A media job reached a final state (worker -> the API process waiting on it)."""

    request_id: str
    status: str


# -- admin -> host supervisor --------------------------------------------------------


class HostMode(StrEnum):
    INDIVIDUAL = "individual"
    """One worker per device."""
    TP = "tp"
    """One tensor-parallel group over ``size`` devices serving one model (the rest individual)."""


@dataclass(slots=True)
class ModeChange:
    """Switch a host between independent workers and a tensor-parallel group
    (``POST /v1/admin/hosts/{host}/mode`` -> the host's command list)."""

    id: str
    mode: HostMode
    model: str | None = None
    size: int | None = None
    at: float = 0.0


_TYPES: dict[str, type] = {
    "req": GenerateRequest,
    "tok": TokenEvent,
    "err": ErrorEvent,
    "media": MediaRequest,
    "job": JobEvent,
    "speech": SpeechRequest,
    "vision": VisionRequest,
    "audio": AudioChunk,
    "mode": ModeChange,
}
_TAGS = {cls: tag for tag, cls in _TYPES.items()}


def _build(tag: str, d: dict[str, Any]) -> Any:
    cls = _TYPES[tag]
    if issubclass(cls, GenerateRequest):
        p = d["params"]
        p["stop"] = tuple(p.get("stop", ()))
        p["stop_token_ids"] = tuple(p.get("stop_token_ids", ()))
        p["logit_bias"] = tuple(tuple(pair) for pair in p.get("logit_bias", ()))
        if p.get("constraint") is not None:
            p["constraint"] = Constraint(**p["constraint"])
        d["params"] = SamplingParams(**p)
    if "tier" in d:
        d["tier"] = Tier(d["tier"])
    if cls is ModeChange:
        d["mode"] = HostMode(d["mode"])
    return cls(**d)


# orjson serializes dataclasses natively, ~20x faster than json + dataclasses.asdict:
# this runs once per token per request on the hot path.


def to_dict(msg: Any) -> dict[str, Any]:
    """A message as plain data, for carriers other than these encodings (rq job arguments)."""
    return dataclasses.asdict(msg)


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    return _build(_TAGS[cls], dict(d))


def encode(msg: Any) -> bytes:
    return orjson.dumps([_TAGS[type(msg)], msg])


def decode(raw: str | bytes) -> Any:
    tag, d = orjson.loads(raw)
    return _build(tag, d)


def encode_batch(msgs: list[Any]) -> bytes:
    return orjson.dumps([[_TAGS[type(m)], m] for m in msgs])


def join_encoded(encoded: list[bytes]) -> bytes:
    """``encode_batch`` of messages already ``encode``d one by one (the same bytes):
    the publisher writes each token event to its output log and reuses that encoding."""
    return b"[" + b",".join(encoded) + b"]"


def decode_batch(raw: str | bytes) -> list[Any]:
    return [_build(tag, d) for tag, d in orjson.loads(raw)]


# A worker's heartbeat is a Redis hash (``keys.worker(id)``): strings as they are,
# everything else as JSON, so operators can read it with HGETALL.


def encode_heartbeat(info: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in info.items()}


def decode_heartbeat(raw: dict[str, str]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            info[k] = orjson.loads(v)
        except orjson.JSONDecodeError:
            info[k] = v
    return info
