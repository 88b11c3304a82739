"""The model registry: one TOML file mapping public model names to where the weights
come from, their modality, dtype, memory estimate, tensor-parallel degree and batch limits."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class Modality(StrEnum):
    TEXT = "text"
    VISION = "vision"
    SPEECH = "speech"
    IMAGE = "image"
    VIDEO = "video"


@dataclass(frozen=True, slots=True)
class GgufSource:
    package: str
    """Installed Python package (import name) that ships the GGUF file; never imported."""
    file: str


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    modality: Modality
    hf_id: str | None = None
    path: str | None = None
    gguf: GgufSource | None = None
    dtype: str = "auto"
    """``auto`` = bfloat16 where the device computes it natively (GPUs; CPUs with avx512_bf16 or
    amx_bf16), else float32 (``gpu_worker.precision``); or pinned: float32/bfloat16/float16."""
    memory_gb: float = 1.0
    tensor_parallel: int = 1
    max_batch: int = 32
    """Most sequences (text) or items (media) one worker runs at once for this model."""
    max_prefill_tokens: int = 2048
    """Most prompt tokens prefilled in one engine step, so long prompts don't stall decoding."""
    context_length: int | None = None
    """Overrides the model config's max_position_embeddings."""
    reasoning: bool = False
    """Model emits ``<think>...</think>``; returned as ``reasoning_content``."""
    tool_parser: str | None = None
    """How the model writes tool calls (one of ``TOOL_PARSERS``); None = no tool calling."""
    device: str = "any"
    """Placement affinity: ``cuda`` (GPU workers only), ``cpu``, or ``any`` (GPU workers preferred)."""
    sampling: dict = field(default_factory=dict)
    """The model's recommended sampling (``[models.X.sampling]``), used for every parameter of
    ``SAMPLING_PARAMS`` that a request leaves unset, as vLLM uses a model's generation_config."""
    extra: dict = field(default_factory=dict)


SAMPLING_PARAMS = frozenset(
    {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"})


TOOL_PARSERS = frozenset({"hermes"})
"""Tool-call formats the API implements (``api.tool_calls``)."""


class Registry:
    def __init__(self, specs: dict[str, ModelSpec]):
        self._specs = specs

    @classmethod
    def load(cls, path: Path) -> Registry:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        specs = {}
        for name, raw in data.get("models", {}).items():
            raw = dict(raw)
            gguf = raw.pop("gguf", None)
            known = set(ModelSpec.__slots__) - {"name", "extra", "modality", "gguf"}
            extra = {k: raw.pop(k) for k in list(raw) if k not in known and k != "modality"}
            unknown = set(raw.get("sampling", {})) - SAMPLING_PARAMS
            if unknown:
                raise ValueError(f"{path}: models.{name}.sampling: unknown parameters {sorted(unknown)} "
                                 f"(known: {sorted(SAMPLING_PARAMS)})")
            if raw.get("tool_parser") not in (None, *TOOL_PARSERS):
                raise ValueError(f"{path}: models.{name}.tool_parser: unknown parser {raw['tool_parser']!r} "
                                 f"(known: {sorted(TOOL_PARSERS)})")
            specs[name] = ModelSpec(
                name=name,
                modality=Modality(raw.pop("modality")),
                gguf=GgufSource(**gguf) if gguf else None,
                extra=extra,
                **raw,
            )
        return cls(specs)

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def __getitem__(self, name: str) -> ModelSpec:
        return self._specs[name]

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def names(self) -> list[str]:
        return list(self._specs)
