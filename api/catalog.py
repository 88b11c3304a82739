"""What the API knows about models: the registry, plus for text models the tokenizer
and context length it needs to render prompts and reject oversized ones before
anything is enqueued."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from api.errors import OpenAIError, model_not_found
from api.offload import Offload
from inferstack import modelstore, structured
from inferstack.registry import Modality, ModelSpec, Registry

log = logging.getLogger(__name__)


@dataclass
class TextModel:
    spec: ModelSpec
    tokenizer: object
    context_length: int
    offload: Offload
    """Templating and tokenizing run here, never on the event loop."""

    @property
    def native_tools(self) -> bool:
        """The chat template renders ``tools``, tool calls and tool results itself."""
        template = self.tokenizer.chat_template
        return isinstance(template, str) and "tools" in template

    async def render_chat(self, messages: list[dict], tools: list[dict] | None = None, tool_format=None,
                          **template_kwargs) -> list[int]:
        """``tools`` (OpenAI function tools) go to the template; a template without tool
        support gets ``tool_format``'s fallback (tools in the system message, calls and
        results as text: ``api.tool_calls``)."""
        return await self.offload(self._render_chat, messages, tools, tool_format, template_kwargs)

    async def encode(self, texts: list[str]) -> list[list[int]]:
        return await self.offload(lambda: [self.tokenizer(t)["input_ids"] for t in texts])

    def _render_chat(self, messages: list[dict], tools: list[dict] | None = None, tool_format=None,
                     template_kwargs: dict | None = None) -> list[int]:
        if not self.native_tools and (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)):
            messages, tools = tool_format.fallback_messages(messages, tools), None
        text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                                  **(template_kwargs or {}))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        eos = self.tokenizer.eos_token_id
        return frozenset() if eos is None else frozenset([eos])


class Catalog:
    def __init__(self, registry: Registry, cache_dir: Path, offload: Offload):
        self.registry = registry
        self.cache_dir = cache_dir
        self.offload = offload
        self._text: dict[str, TextModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def spec(self, name: str) -> ModelSpec:
        spec = self.registry.get(name)
        if spec is None:
            raise model_not_found(name)
        return spec

    async def text(self, name: str) -> TextModel:
        spec = self.spec(name)
        if spec.modality not in (Modality.TEXT, Modality.VISION):
            raise OpenAIError(400, f"`{name}` is a {spec.modality} model; it does not serve this endpoint.",
                              param="model", code="model_not_supported")
        if name in self._text:
            return self._text[name]
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._text:
                try:
                    self._text[name] = await asyncio.to_thread(self._load_text, spec)
                except modelstore.ModelUnavailable as exc:
                    raise OpenAIError(404, f"The model `{name}` is not available on this deployment: {exc}",
                                      param="model", code="model_not_found") from exc
        return self._text[name]

    def _load_text(self, spec: ModelSpec) -> TextModel:
        from transformers import AutoTokenizer

        path = modelstore.resolve(spec, self.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        context = spec.context_length
        if context is None:
            config = json.loads((Path(path) / "config.json").read_text())
            config = config.get("text_config", config)
            context = int(config.get("max_position_embeddings", 4096))
        structured.warm()  # here, off the event loop, not in the first structured request
        log.info("tokenizer for %s loaded (context %d)", spec.name, context)
        return TextModel(spec, tokenizer, context, self.offload)
