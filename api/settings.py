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
    job_result_ttl_s: int = Field(3600, description="How long a finished media job and its files are kept.")
    job_queue_ttl_s: int = Field(3600, description="A media job not started within this is discarded by rq.")
    job_timeout_s: int = Field(1800, description="rq job timeout of a media job (checked between denoising steps).")
    job_retries: int = Field(1, description="rq retries of a media job that failed (not of a cancelled one).")
    max_jobs_per_user: int = Field(16, description="Media jobs one user may have queued or running at once.")
    max_jobs_queued: int = Field(1000, description="Media jobs waiting per model before 429.")
    image_wait_s: float = Field(
        60.0, description="POST /v1/images/generations waits this long for the result, then answers 202 with the job.")
    fetch_timeout_s: float = Field(10.0, description="Time limit for fetching an http(s) image URL of a chat message.")
    fetch_max_bytes: int = Field(20 * 1024 * 1024, description="Size limit of one image in a chat message.")
    stream_grace_s: float = Field(
        10.0, description="A streaming client that disconnects before the end leaves its request generating this long, "
                          "resumable with Last-Event-ID; then it is cancelled. 0 = cancel at once.")
    admin_key: str | None = Field(None, description="Bearer key for admin endpoints (/v1/stats); unset = open.")
    api_workers: int = Field(
        1, ge=1, description="API processes sharing the port (uvicorn workers); >1 uses Prometheus multiprocess mode."
    )
