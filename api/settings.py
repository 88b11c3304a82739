from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from pathlib import Path

from pydantic import Field, field_validator

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
    fetch_allow_hosts: str = Field(
        "", description="Comma-separated hosts image URLs may name (`img.example.com`, or `.example.com` for its "
                        "subdomains); empty = any public host.")
    fetch_allow_networks: str = Field(
        "", description="Comma-separated CIDRs image URLs may reach besides public addresses (an internal image "
                        "store); loopback, private, link-local and reserved ranges are refused otherwise.")
    admin_key: str | None = Field(None, description="Bearer key for admin endpoints (/v1/stats, /metrics); unset = "
                                                    "open unless a keys file is set.")
    # -- limits checked before any work (docs/SECURITY.md) --
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Largest request body (413 beyond, before it "
                                                                    "is read to the end).")
    max_messages: int = Field(2048, ge=1, description="Most messages in one chat request.")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="Most characters of text in one request's "
                                                               "messages or prompts, counted before tokenizing.")
    max_images: int = Field(16, ge=0, description="Most image parts in one chat request (vision models).")
    max_prompts: int = Field(64, ge=1, description="Most prompts in one /v1/completions call.")
    max_stop: int = Field(4, ge=0, description="Most `stop` sequences.")
    max_stop_chars: int = Field(256, ge=1, description="Longest `stop` sequence.")
    max_stop_token_ids: int = Field(256, ge=0, description="Most `stop_token_ids`.")
    max_logit_bias: int = Field(300, ge=0, description="Most `logit_bias` entries.")
    tokenize_threads: int = Field(4, ge=1, description="Threads that parse, template and tokenize request bodies "
                                                       "off the event loop.")
    api_workers: int = Field(
        1, ge=1, description="API processes sharing the port (uvicorn workers); >1 uses Prometheus multiprocess mode."
    )

    @field_validator("fetch_allow_networks")
    @classmethod
    def _networks(cls, v: str) -> str:
        for net in filter(None, (n.strip() for n in v.split(","))):
            ipaddress.ip_network(net, strict=False)  # a typo fails at start, not on every request
        return v
