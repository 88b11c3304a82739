"""Limits a text request must meet before any work is done for it (no templating,
no tokenizing, nothing enqueued). Each is an ``INFERSTACK_*`` setting
(``api.settings``); docs/SECURITY.md lists them with their defaults."""

from __future__ import annotations

from api.errors import OpenAIError
from api.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from api.settings import ApiSettings


def _too_many(param: str, limit: int, what: str) -> OpenAIError:
    return OpenAIError(400, f"'{param}' may have at most {limit} {what}.", param=param, code="limit_exceeded")


def check_sampling(body: _Sampling, s: ApiSettings, default_deadline_s: float) -> None:
    if body.n > s.max_n:
        raise OpenAIError(400, f"n must be at most {s.max_n}.", param="n", code="invalid_value")
    stops = body.stop or ()
    if len(stops) > s.max_stop:
        raise _too_many("stop", s.max_stop, "sequences")
    if any(len(stop) > s.max_stop_chars for stop in stops):
        raise _too_many("stop", s.max_stop_chars, "characters per sequence")
    if len(body.stop_token_ids or ()) > s.max_stop_token_ids:
        raise _too_many("stop_token_ids", s.max_stop_token_ids, "entries")
    if len(body.logit_bias or ()) > s.max_logit_bias:
        raise _too_many("logit_bias", s.max_logit_bias, "entries")
    if body.deadline_s is not None and body.deadline_s > default_deadline_s:
        raise OpenAIError(400, f"deadline_s may only shorten the default deadline of {default_deadline_s:g} s.",
                          param="deadline_s", code="invalid_value")


def check_chat(body: ChatCompletionRequest, s: ApiSettings, default_deadline_s: float) -> None:
    check_sampling(body, s, default_deadline_s)
    if len(body.messages) > s.max_messages:
        raise _too_many("messages", s.max_messages, "messages")
    images = sum(1 for m in body.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if images > s.max_images:
        raise _too_many("messages", s.max_images, "images")
    chars = sum(len(m.text()) for m in body.messages)
    if chars > s.max_prompt_chars:
        raise _too_many("messages", s.max_prompt_chars, "characters of text")


def check_completion(body: CompletionRequest, s: ApiSettings, default_deadline_s: float) -> None:
    check_sampling(body, s, default_deadline_s)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > s.max_prompts:
        raise _too_many("prompt", s.max_prompts, "prompts")
    texts = [prompt] if isinstance(prompt, str) else [p for p in prompt if isinstance(p, str)]
    if sum(len(t) for t in texts) > s.max_prompt_chars:
        raise _too_many("prompt", s.max_prompt_chars, "characters of text")
