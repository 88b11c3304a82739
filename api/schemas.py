"""Request and response bodies, following the OpenAI schema (plus the usual
extensions: top_k, min_p, repetition_penalty, ignore_eos, min_tokens, vLLM's
structured_outputs, and ours: priority, session_id, deadline_s).

No field is silently ignored. A field this server does not know is a 400
``unsupported_parameter`` (``extra="forbid"``); an OpenAI field it does not implement
is declared and refused when set (``unsupported_parameter``), or for some values only
(``unsupported_value``); ``null`` always means unset. A few fields with no effect here
are accepted and documented as such (README: "Accepted and ignored"): ``metadata``,
``safety_identifier``, ``prompt_cache_key``, ``stream_options.include_obfuscation``,
speech ``instructions``, image ``moderation``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

Tier = Literal["high", "normal", "low"]

NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"

INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
"""Integers travel to the workers as JSON; anything wider than 64 bits is refused here."""
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
"""Checked against the model's vocabulary once the model is known."""


def unsupported_parameter(message: str) -> PydanticCustomError:
    """The field is known but not implemented here (400 ``unsupported_parameter``)."""
    return PydanticCustomError("unsupported_parameter", message.replace("{", "{{").replace("}", "}}"))


def unsupported_value(message: str) -> PydanticCustomError:
    """The field is implemented, but not with this value (400 ``unsupported_value``)."""
    return PydanticCustomError("unsupported_value", message.replace("{", "{{").replace("}", "}}"))


def Refused(why: str, *, unless: tuple = ()):  # noqa: N802 - used like a type
    """An OpenAI field this server does not implement: null (or a value in ``unless``,
    which has no effect) is accepted, anything else is a 400 ``unsupported_parameter``."""

    def check(v):
        if v is None or v in unless:
            return v
        raise unsupported_parameter(why)

    return Annotated[Any, BeforeValidator(check)]


def OnlyValues(*allowed, why: str):  # noqa: N802 - used like a type
    """An OpenAI field of which only ``allowed`` values (and null) have a meaning here;
    others are a 400 ``unsupported_value``."""

    def check(v):
        if v is None or v in allowed:
            return v
        raise unsupported_value(why)

    return Annotated[Any, BeforeValidator(check)]


def Kind(*allowed: str, what: str):  # noqa: N802 - used like a type
    """A ``type`` field: the kinds of ``what`` this server serves; others are a 400
    ``unsupported_value`` (an OpenAI kind we do not implement, e.g. a ``custom`` tool)."""

    def check(v: str) -> str:
        if v not in allowed:
            raise unsupported_value(f"{what} of type '{v}' are not supported (supported: {', '.join(allowed)}).")
        return v

    return Annotated[str, AfterValidator(check)]


class _Body(BaseModel):
    """Every request body and part of one: unknown fields are refused, never ignored;
    NaN and Infinity (which Python's JSON accepts) are no number a request may carry."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None
    """Accepted; there is no obfuscation padding on this server's stream events."""


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs`` (extra body): exactly one of ``json`` (a JSON
    schema, as an object or text), ``regex``, ``choice``."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=10_000)
    choice: list[Annotated[str, Field(max_length=1000)]] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("json_", "regex", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice")
        return self


class _Sampling(_Body):
    """Parameters shared by chat and completions. Counts and lengths that operators
    configure (stop sequences, stop_token_ids, logit_bias, messages, prompt size) are
    checked by ``api.limits`` before any work."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: Int64 | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    """Token id (as a string) -> bias added to its logit (OpenAI's range, -100 to 100)."""
    # extensions (vLLM names)
    structured_outputs: StructuredOutputs | None = None
    top_k: int = Field(0, ge=-1, le=INT64_MAX)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.1, le=2.0)  # below, logits / penalty overflows
    ignore_eos: bool = False
    min_tokens: Count = 0
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    # ours
    priority: Tier | None = None
    session_id: str | None = Field(None, max_length=256)
    deadline_s: float | None = Field(None, gt=0.0, description="Fail if not started within this many seconds "
                                                                "(at most the server's default).")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _check(self):
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Body):
    type: Kind("text", "image_url", "input_audio", "refusal", what="Content parts")
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: dict | None = None
    """Refused by the chat route: no model here takes audio input."""
    refusal: str | None = None


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1_000_000)
    """JSON text, as the model wrote it."""
    parsed_arguments: Any = None
    """Accepted: the openai SDK's ``parse()`` helpers echo ``arguments`` parsed here."""


class ToolCall(_Body):
    """A tool call in an assistant message of the history."""

    id: str = Field(min_length=1, max_length=256)
    type: Kind("function", what="Tool calls") = "function"
    function: FunctionCall
    index: int | None = None
    """Accepted: set on calls the openai SDK assembled from a stream."""


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    """Accepted and passed to the chat template with the message (most templates ignore it)."""
    tool_calls: list[ToolCall] | None = None
    """Assistant messages: the calls it made."""
    tool_call_id: str | None = Field(None, max_length=256)
    """Tool messages: the call this is the result of."""
    reasoning_content: str | None = None
    """Assistant messages of reasoning models: their reasoning, for templates that show it."""
    refusal: str | None = None
    """Assistant messages: accepted (a refusal the model gave; this server never sets one)."""
    parsed: Any = None
    annotations: list | None = None
    """Accepted on assistant messages passed back as the openai SDK returned them
    (``parse()`` echoes the content parsed; annotations are web-search citations)."""
    audio: Refused("Audio output is not supported, so assistant messages cannot refer to it.") = None
    function_call: Refused("function_call is deprecated and not supported; use tool_calls.") = None

    @model_validator(mode="after")
    def _roles(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("missing", "tool messages need the tool_call_id they answer")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class FunctionDefinition(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = None
    """A JSON schema for the arguments (an object); None = no arguments."""
    strict: bool | None = None
    """Arguments are always held to ``parameters`` by constrained decoding; ``strict``
    also refuses properties the schema does not list."""


class Tool(_Body):
    type: Kind("function", what="Tools")
    function: FunctionDefinition | None = None
    custom: Any = None

    @model_validator(mode="after")
    def _function(self):
        if self.function is None:
            raise PydanticCustomError("missing", "a function tool needs its 'function'")
        return self


class NamedFunction(_Body):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


def _tool_choice(v):
    if isinstance(v, dict) and v.get("type") not in (None, "function"):
        raise unsupported_value(f"tool_choice of type '{v.get('type')}' is not supported; use 'none', 'auto', "
                                "'required' or a named function.")
    return v


class JsonSchemaSpec(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """None = any JSON object."""
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Kind("text", "json_object", "json_schema", what="Response formats")
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", "response_format of type json_schema needs 'json_schema'")
        return self


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Annotated[Literal["none", "auto", "required"] | NamedToolChoice | None,
                           BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    """Reasoning models: ``none`` turns thinking off (the template's ``enable_thinking``);
    other levels leave it on (no budgets). Other models: 400."""
    # OpenAI fields with no effect here, accepted (README: "Accepted and ignored")
    metadata: dict[str, str] | None = Field(None, max_length=16)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    """Prefix caching here is automatic (and sessions use ``session_id``)."""
    # OpenAI fields honoured for some values only
    store: OnlyValues(False, why="Completions are not stored on this server (store must be false).") = None
    service_tier: OnlyValues("auto", "default", why="Only service_tier 'auto' and 'default' are available; "
                             "use priority to lower a request's tier.") = None
    prompt_cache_retention: OnlyValues("in_memory", why="Only in_memory prompt caching exists here.") = None
    modalities: OnlyValues(["text"], why="Only text output is supported (modalities must be ['text']).") = None
    # OpenAI fields this server does not implement
    audio: Refused("Audio output is not supported.") = None
    prediction: Refused("Predicted outputs are not supported.") = None
    functions: Refused("functions is deprecated and not supported; use tools.") = None
    function_call: Refused("function_call is deprecated and not supported; use tool_choice.") = None
    web_search_options: Refused("Web search is not available on this server.") = None
    verbosity: Refused("verbosity is not supported by this server.") = None
    moderation: Refused("moderation is not supported by this server.") = None
    prompt_cache_options: Refused("prompt_cache_options is not supported by this server.") = None

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @field_validator("response_format")
    @classmethod
    def _one_format(cls, v, info):
        if v is not None and v.type != "text" and info.data.get("structured_outputs") is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, v, info):
        if v not in (None, "none", "auto") and not info.data.get("tools"):
            raise ValueError("tool_choice 'required' or a named function needs tools")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: Refused("suffix is not supported.", unless=("",)) = None
    best_of: int | None = Field(None, ge=1, le=INT64_MAX)
    """Accepted when it equals n (or is unset): no server-side best-of here."""

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise unsupported_value("best_of is not supported (it must be unset or equal n).")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ImageGenerationRequest(_Body):
    """OpenAI's image generation body, plus ``seed``, ``steps``, ``guidance_scale``,
    ``negative_prompt`` and ``async`` (answer 202 with a job at once)."""

    model: str | None = None
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    user: str | None = Field(None, max_length=256)
    seed: int | None = Field(None, ge=0, lt=2**31)
    steps: int | None = Field(None, ge=1, le=100)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    negative_prompt: str | None = Field(None, max_length=4000)
    priority: Tier | None = None
    async_: bool = Field(False, alias="async")
    moderation: Literal["auto", "low"] | None = None
    """Accepted: this server runs no content moderation at any level."""
    output_format: OnlyValues("png", why="Images are PNG here (output_format must be png).") = None
    background: OnlyValues("auto", why="Only background 'auto' is supported.") = None
    quality: OnlyValues("auto", "standard", why="Use steps to trade quality for speed "
                        "(quality must be auto or standard).") = None
    stream: OnlyValues(False, why="Image generation does not stream; use async for a job.") = None
    partial_images: OnlyValues(0, why="Partial images are not supported.") = None
    output_compression: Refused("output_compression is not supported (images are PNG).") = None
    style: Refused("style is not supported by this server.") = None


class SpeechRequestBody(_Body):
    """OpenAI's /v1/audio/speech body (``instructions`` is accepted and ignored: Kokoro
    has no style prompt), plus ``priority``."""

    model: str | None = None
    input: str = Field(min_length=1, max_length=4096)
    voice: str = Field(min_length=1, max_length=64)
    response_format: Literal["wav", "mp3", "flac", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = Field(None, max_length=4096)
    user: str | None = Field(None, max_length=256)
    priority: Tier | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _format(cls, v):
        if v in ("opus", "aac"):
            raise unsupported_value(f"response_format '{v}' is not supported (wav, mp3, flac, pcm are).")
        return v


class VideoGenerationRequest(_Body):
    model: str | None = None
    prompt: str = Field(min_length=1, max_length=4000)
    size: str | None = None
    num_frames: int | None = Field(None, ge=1, le=257)
    fps: int = Field(8, ge=1, le=60)
    seed: int | None = Field(None, ge=0, lt=2**31)
    steps: int | None = Field(None, ge=1, le=100)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)
    negative_prompt: str | None = Field(None, max_length=4000)
    user: str | None = Field(None, max_length=256)
    priority: Tier | None = None


class ModeChangeRequest(_Body):
    """``POST /v1/admin/hosts/{host}/mode``: run the host's devices as independent workers,
    or as one tensor-parallel group of ``size`` devices serving ``model``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["individual", "tp"]
    model: str | None = Field(None, max_length=256)
    size: int | None = Field(None, ge=2, le=64)
