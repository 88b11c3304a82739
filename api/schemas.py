"""Request and response bodies, following the OpenAI schema (plus the usual
extensions: top_k, min_p, repetition_penalty, ignore_eos, min_tokens, and ours:
priority, session_id, deadline_s)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.messages import Tier

INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
"""Integers travel to the workers as JSON; anything wider than 64 bits is refused here."""
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
"""Checked against the model's vocabulary once the model is known."""


class _Body(BaseModel):
    # NaN and Infinity (which Python's JSON accepts) are no number a request may carry.
    model_config = ConfigDict(allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Parameters shared by chat and completions. Counts and lengths that operators
    configure (stop sequences, stop_token_ids, logit_bias, messages, prompt size) are
    checked by ``api.limits`` before any work."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

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
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Validated and capped; not applied by the sampler yet.")
    seed: Int64 | None = None
    user: str | None = Field(None, max_length=256)
    # extensions (vLLM names)
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
    detail: str | None = None


class ContentPart(_Body):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url", "input_audio"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1, le=INT64_MAX)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None

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

    model_config = ConfigDict(extra="allow", populate_by_name=True)

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


class SpeechRequestBody(_Body):
    """OpenAI's /v1/audio/speech body (``instructions`` is accepted and ignored: Kokoro
    has no style prompt), plus ``priority``."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str = Field(min_length=1, max_length=4096)
    voice: str = Field(min_length=1, max_length=64)
    response_format: Literal["wav", "mp3", "flac", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    user: str | None = Field(None, max_length=256)
    priority: Tier | None = None


class VideoGenerationRequest(_Body):
    model_config = ConfigDict(extra="allow")

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
