from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field

from inferstack.settings import CommonSettings


class StoreSettings(CommonSettings):
    """Where request rows live: a ClickHouse server, or chDB (embedded) in a local directory."""

    clickhouse_url: str | None = Field(
        None, description="ClickHouse HTTP URL, e.g. http://user:pass@clickhouse:8123; unset = chDB in chdb_path."
    )
    clickhouse_database: str = Field("inferstack", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                     description="Database of the request tables (created if missing).")
    chdb_path: Path | None = Field(None, description="chDB data directory (default: <cache_dir>/chdb).")

    @property
    def chdb_dir(self) -> Path:
        return self.chdb_path or self.cache_dir / "chdb"


class MetricsServerSettings(CommonSettings):
    """A process that serves Prometheus metrics on a port of its own (workers, the exporter)."""

    metrics_port: int = Field(0, description="Port of this process's Prometheus /metrics (0 = off).")
    metrics_host: str = Field(
        "127.0.0.1", description="Address that port binds to: it has no authentication, so loopback unless "
                                 "opened (0.0.0.0 for a pod or a compose network tenants cannot reach)."
    )


class ExporterSettings(StoreSettings, MetricsServerSettings):
    exporter_id: str = Field(
        default_factory=lambda: f"exporter-{socket.gethostname()}",
        description="Consumer name in the group; stable across restarts, so a restarted exporter re-reads what it "
                    "had read but not yet written.",
    )
    exporter_batch: int = Field(500, description="Most events read and written per batch.")
    exporter_flush_s: float | None = Field(
        None, gt=0, description="Longest an event waits in the exporter before it is written (default: 1 s to a "
        "ClickHouse server, 5 s to chDB, whose every insert opens the embedded database afresh: 50-170 ms of CPU "
        "each, which once a second took 5-10 % of a 2-core host's compute from its worker).")

    @property
    def flush_s(self) -> float:
        if self.exporter_flush_s is not None:
            return self.exporter_flush_s
        return 1.0 if self.clickhouse_url else 5.0
    exporter_claim_idle_s: float = Field(
        30.0, description="Events read by another exporter and unacknowledged this long are taken over (it died)."
    )
