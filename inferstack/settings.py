"""Settings shared by every component. Each component has one frozen settings object
read from ``INFERSTACK_*`` environment variables (``api.settings``,
``gpu_worker.settings``, ``scheduler.settings``); tests build them directly."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_models_file() -> Path:
    local = Path.cwd() / "models.toml"
    return local if local.exists() else REPO_ROOT / "models.toml"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERSTACK_", frozen=True, extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("INFERSTACK_REDIS_URL", "REDIS_URL"),
        description="Redis shared by API replicas and workers.",
    )
    models_file: Path = Field(default_factory=_default_models_file, description="Model registry (TOML).")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "inferstack",
        description="Converted models and other derived files (safe to delete).",
    )
    events_maxlen: int = Field(
        100_000, description="Approximate cap of the lifecycle event stream (is:events) feeding the metrics exporter."
    )
    redis_outage_s: float = Field(
        30.0, description="How long a Redis outage is ridden out: open streams stay open and workers keep generating "
                          "into a buffer; beyond it streams end with an error event and workers drop what they hold.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP endpoint for traces (or the standard OTEL_EXPORTER_OTLP_* variables); unset = off."
    )
