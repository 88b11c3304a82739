from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field

from metrics.settings import MetricsServerSettings


class WorkerSettings(MetricsServerSettings):
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    worker_models: str = Field("smollm2-135m", description="Comma-separated registry names this worker loads at start.")
    worker_serves: str = Field(
        "*", description="Models this worker may load on demand: comma-separated names, or * for every registry "
        "model whose weights are on this host.")
    memory_budget_gb: float | None = Field(
        None, description="Most memory the worker's models may take together (default: free device memory).")
    memory_reserve_gb: float = Field(0.5, description="Device memory the model manager always leaves free.")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] | None = Field(
        None, description="Overrides the registry dtype; auto = bfloat16 where the GPU or CPU computes it natively "
        "(avx512_bf16, amx_bf16), else float32 (see gpu_worker.precision).")
    max_batch: int | None = Field(None, description="Overrides the registry's max_batch (sequences per step).")
    max_prefill_tokens: int | None = Field(None, description="Overrides the registry's prefill budget per step.")
    kv_cache_bytes: int | None = Field(
        None, description="Batch KV cache budget in bytes (default: the registry memory_gb minus the weights)."
    )
    kv_block_size: int | None = Field(
        None, description="Tokens per block of the paged KV cache (default: 256 on CUDA, as FlashAttention-2's paged "
        "kernel needs; 64 on CPU).")
    attention: Literal["auto", "slots", "sdpa", "paged", "varlen"] = Field(
        "auto", description="KV cache layout and attention: slots = a dense row per sequence, SDPA in place (auto on "
        "CPU); sdpa = the paged cache, blocks gathered for SDPA; paged/varlen = the paged cache through torch's flash "
        "varlen kernel, by block table or over gathered keys (CUDA; auto takes the first that matches sdpa on a probe "
        "at load).")
    cuda_graphs: bool = Field(True, description="Replay decode steps from CUDA graphs (paged attention on CUDA only).")
    kv_reuse: bool = Field(True, description="Keep session and prefix KV caches in DRAM and reuse them.")
    kv_dram_bytes: int = Field(1 << 30, description="DRAM budget of the session/prefix KV store (LRU).")
    prefix_min_hits: int = Field(
        2, description="Distinct conversations (or sessionless requests) that must share a prefix before its KV is kept."
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous", description="static = admit only into an empty batch (the baseline for benchmarks)."
    )
    heartbeat_s: float = Field(
        0.5, description="Heartbeat, lease renewal and reaper period; a worker silent for INFERSTACK_WORKER_DEAD_S is "
                         "dead.")
    heartbeat_ttl_s: float = Field(5.0, description="A worker silent this long is considered dead.")
    outage_buffer_events: int = Field(
        50_000, description="Events a worker keeps while Redis is unreachable; at the cap it pauses generating.")
    drain_timeout_s: float = Field(10.0, description="On SIGTERM, how long running requests may finish.")
    torch_threads: int | None = Field(None, description="torch intra-op threads (default: torch's choice).")
    host_id: str = Field(default_factory=socket.gethostname,
                         description="The host (supervisor) this worker belongs to, as the admin API names it.")
    tp_size: int = Field(1, description="Ranks of this worker's tensor-parallel group (1: no group; the host "
                         "supervisor sets these for the ranks it starts).")
    tp_rank: int = Field(0, description="This process's rank: 0 claims, plans and publishes; the others follow.")
    tp_master: str = Field("127.0.0.1:29500", description="host:port where the group's ranks meet (rank 0 listens).")
    tp_devices: str = Field("", description="Every rank's device, comma-separated (what the heartbeat shows).")
    tp_timeout_s: float = Field(
        60.0, description="A collective, or an idle follower's wait for rank 0, failing or lasting longer takes the "
        "group down (its requests go back to the queue).")

    @property
    def runner_options(self) -> dict:
        """What the text engine's model runner takes from these settings (every rank the same)."""
        return {"block_size": self.kv_block_size, "attention_backend": self.attention, "cuda_graphs": self.cuda_graphs}

    @property
    def model_names(self) -> list[str]:
        return [m.strip() for m in self.worker_models.split(",") if m.strip()]

    @property
    def serve_names(self) -> set[str] | None:
        """None = any registry model; otherwise the named ones plus the preloaded ones."""
        if self.worker_serves.strip() == "*":
            return None
        return {m.strip() for m in self.worker_serves.split(",") if m.strip()} | set(self.model_names)
