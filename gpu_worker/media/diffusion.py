"""What the image and video engines share: loading a diffusers pipeline, per-item
seeds, and turning the pipeline's step callback into ``on_step`` (progress,
cancellation, timeouts between denoising steps)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from broker.messages import MediaRequest
from gpu_worker.engine import MediaFile, OnStep
from inferstack.registry import ModelSpec

log = logging.getLogger(__name__)


class DiffusionEngine:
    """Base of the image and video engines: subclasses say how to call the pipeline
    for one batch and how to encode its output."""

    pipeline_class = "DiffusionPipeline"

    def __init__(self, spec: ModelSpec, model_dir: Path | str, *, device: torch.device, dtype: torch.dtype,
                 max_batch: int):
        import diffusers

        self.model = spec.name
        self.spec = spec
        self.device = device
        self.max_batch = max_batch
        cls = getattr(diffusers, self.pipeline_class)
        self.pipe = cls.from_pretrained(str(model_dir), dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)  # progress goes to job meta and the log
        self.default_steps = int(spec.extra.get("steps", 4))
        self.default_guidance = float(spec.extra.get("guidance_scale", 0.0))

    # -- what the job consumer calls --------------------------------------------

    def steps_of(self, req: MediaRequest) -> int:
        return req.steps or self.default_steps

    def guidance_of(self, req: MediaRequest) -> float:
        return self.default_guidance if req.guidance_scale is None else req.guidance_scale

    def batch_key(self, req: MediaRequest) -> tuple:
        return (req.width, req.height, self.steps_of(req), self.guidance_of(req), req.num_frames,
                bool(req.negative_prompt))

    # Job engines take no fair-queue work: to the claimer, heartbeat and cancel listener
    # they are engines with no capacity and nothing held (the consumer pins the model
    # while a batch runs, so it is never evicted mid-batch).
    def capacity(self) -> int:
        return 0

    def has_work(self) -> bool:
        return False

    def request_ids(self) -> list[str]:
        return []

    def abort(self, request_id: str) -> None:
        pass  # jobs are cancelled through rq

    @torch.inference_mode()
    def run(self, requests: list[MediaRequest], on_step: OnStep) -> list[list[MediaFile]]:
        first = requests[0]
        steps = self.steps_of(first)
        prompts, generators = [], []
        for req in requests:
            seed = req.seed if req.seed is not None else random.randrange(2**31)
            for i in range(req.n):
                prompts.append(req.prompt)
                generators.append(torch.Generator(device="cpu").manual_seed(seed + i))

        def callback(pipe, i, t, tensors):
            if not on_step(i + 1, steps):
                pipe._interrupt = True  # diffusers' documented way to stop the denoising loop
            return tensors

        kwargs = dict(num_inference_steps=steps, guidance_scale=self.guidance_of(first), generator=generators,
                      callback_on_step_end=callback, height=first.height, width=first.width)
        if first.negative_prompt:
            kwargs["negative_prompt"] = [r.negative_prompt for r in requests for _ in range(r.n)]
        outputs = self.generate(prompts, first, kwargs)
        files, at = [], 0
        for req in requests:
            files.append([self.encode(o, req) for o in outputs[at: at + req.n]])
            at += req.n
        return files

    def close(self) -> None:
        self.pipe = None

    # -- per modality ------------------------------------------------------------

    def generate(self, prompts: list[str], first: MediaRequest, kwargs: dict) -> list:
        raise NotImplementedError

    def encode(self, output, req: MediaRequest) -> MediaFile:
        raise NotImplementedError
