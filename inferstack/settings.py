"""Settings shared by every component. Each component has one frozen settings object
read from ``INFERSTACK_*`` environment variables (``api.settings``,
``gpu_worker.settings``, ``scheduler.settings``); tests build them directly."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from broker.connection import RedisMode, RedisTarget

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_models_file() -> Path:
    local = Path.cwd() / "models.toml"
    return local if local.exists() else REPO_ROOT / "models.toml"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERSTACK_", frozen=True, extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("INFERSTACK_REDIS_URL", "REDIS_URL"),
        description="Redis shared by API replicas and workers (sentinel mode: the sentinels; cluster mode: some "
                    "of the nodes; several hosts comma-separated, e.g. redis://:pw@n1:6379,n2:6379).",
    )
    redis_mode: RedisMode = Field(
        RedisMode.STANDALONE, description="standalone, sentinel (a Sentinel-managed primary) or cluster (Redis Cluster).")
    redis_sentinel_master: str = Field("mymaster", description="Sentinel mode: the service name the sentinels watch.")
    rq_redis_url: str | None = Field(
        None, description="Redis of the media job queues (rq): standalone or sentinel, never a Cluster (rq keeps "
                          "related keys in different slots). Unset = INFERSTACK_REDIS_URL, unless that is a Cluster.")
    rq_redis_mode: RedisMode | None = Field(
        None, description="standalone or sentinel (sentinel: INFERSTACK_RQ_SENTINEL_MASTER names the service). "
                          "Unset = INFERSTACK_REDIS_MODE when INFERSTACK_RQ_REDIS_URL is unset, else standalone.")
    rq_sentinel_master: str | None = Field(None, description="Unset = INFERSTACK_REDIS_SENTINEL_MASTER.")
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

    @model_validator(mode="after")
    def _rq_not_on_a_cluster(self):
        if self.rq_redis_mode is RedisMode.CLUSTER:
            raise ValueError("INFERSTACK_RQ_REDIS_MODE cannot be cluster: rq does not support Redis Cluster")
        return self

    @property
    def redis(self) -> RedisTarget:
        return RedisTarget(self.redis_url, self.redis_mode, self.redis_sentinel_master)

    @property
    def rq_redis(self) -> RedisTarget | None:
        """The media jobs' Redis; None when none is usable (the shared Redis is a Cluster
        and no INFERSTACK_RQ_REDIS_URL is set): media jobs are then refused."""
        master = self.rq_sentinel_master or self.redis_sentinel_master
        if self.rq_redis_url is None:
            if self.redis_mode is RedisMode.CLUSTER:
                return None
            return RedisTarget(self.redis_url, self.rq_redis_mode or self.redis_mode, master)
        return RedisTarget(self.rq_redis_url, self.rq_redis_mode or RedisMode.STANDALONE, master)
