"""Text-to-image (SD Turbo and other diffusers text-to-image pipelines): every prompt
of a batch in one pipeline call, PNG out."""

from __future__ import annotations

import io

from broker.messages import MediaRequest
from gpu_worker.engine import MediaFile
from gpu_worker.media.diffusion import DiffusionEngine


class ImageEngine(DiffusionEngine):
    pipeline_class = "AutoPipelineForText2Image"

    def generate(self, prompts: list[str], first: MediaRequest, kwargs: dict) -> list:
        return self.pipe(prompt=prompts, output_type="pil", **kwargs).images

    def encode(self, image, req: MediaRequest) -> MediaFile:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return MediaFile(buf.getvalue(), "image/png")
