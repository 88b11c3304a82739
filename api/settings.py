from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from pydantic import Field

from metrics.settings import StoreSettings


class ApiSettings(StoreSettings):
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, description="Port the API binds to.")
    instance_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        description="Names this process's reply channel; unique per API process.",
    )
    keys_file: Path | None = Field(None, description="API keys (TOML). Unset = open mode: no key, `user` names the user.")
    default_max_tokens: int = Field(1024, description="max_tokens when a request gives none (capped by the context).")
    max_n: int = Field(8, description="Largest `n` (choices per request).")
    worker_wait_s: float = Field(
        0.0, description="With no live worker for a model, wait this long for one before answering 503 (0 = queue anyway)."
    )
    admin_key: str | None = Field(None, description="Bearer key for admin endpoints (/v1/stats); unset = open.")
    api_workers: int = Field(
        1, ge=1, description="API processes sharing the port (uvicorn workers); >1 uses Prometheus multiprocess mode."
    )
