"""Running the text engine as a two-rank tensor-parallel group in a test: this process
leads as rank 0; rank 1 is a real ``inferstack worker`` follower process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from broker.messages import GenerateRequest, SamplingParams
from gpu_worker.text.engine import TextEngine
from gpu_worker.text.tp import TpGroup, TpRank
from inferstack.registry import ModelSpec

CPU = torch.device("cpu")


def start_follower(tmp_path: Path, name: str, model_dir: Path | None, port: int, **env) -> subprocess.Popen:
    """Rank 1 as the host supervisor starts it: ``inferstack worker`` with the TP variables."""
    registry = tmp_path / "models.toml"
    if model_dir is not None:
        registry.write_text(f'[models."{name}"]\nmodality = "text"\npath = "{model_dir}"\nmax_batch = 3\n')
    else:
        registry = Path(__file__).resolve().parents[1] / "models.toml"
    return subprocess.Popen([sys.executable, "-m", "inferstack.cli", "worker"], env={
        **os.environ, "INFERSTACK_MODELS_FILE": str(registry), "INFERSTACK_WORKER_MODELS": name,
        "INFERSTACK_TP_SIZE": "2", "INFERSTACK_TP_RANK": "1", "INFERSTACK_TP_MASTER": f"127.0.0.1:{port}",
        "INFERSTACK_DEVICE": "cpu", "INFERSTACK_TORCH_THREADS": "1", "INFERSTACK_LOG_LEVEL": "WARNING",
        **{f"INFERSTACK_{k.upper()}": str(v) for k, v in env.items()}})


def text_request(i: int, prompt: list[int], max_tokens: int, session: str | None = None, **kw) -> GenerateRequest:
    params = dict(temperature=0.0, ignore_eos=True) | kw
    return GenerateRequest(id=f"r{i}", model="m", prompt_token_ids=prompt, reply_to="x", session_key=session,
                           params=SamplingParams(max_tokens=max_tokens, **params))


def tp1_engine(spec: ModelSpec, model_dir: Path, dtype, **kw) -> TextEngine:
    return TextEngine(spec, model_dir, device=CPU, dtype=dtype, **kw)


def tp2_engine(spec, model_dir, dtype, follower: subprocess.Popen, port: int, **kw) -> TextEngine:
    group = TpGroup(TpRank(0, 2), f"127.0.0.1:{port}", CPU, timeout_s=60)
    try:
        return TextEngine(spec, model_dir, device=CPU, dtype=dtype, tp_group=group, **kw)
    except BaseException:
        follower.kill()
        group.close()
        raise
