"""Text-to-video (CogVideoX and other diffusers text-to-video pipelines): a batch of
prompts in one pipeline call, MP4 out (H.264 through the ffmpeg that imageio-ffmpeg
ships)."""

from __future__ import annotations

import os
import tempfile

from broker.messages import MediaRequest
from gpu_worker.engine import MediaFile
from gpu_worker.media.diffusion import DiffusionEngine


class VideoEngine(DiffusionEngine):
    pipeline_class = "DiffusionPipeline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_frames = int(self.spec.extra.get("num_frames", 49))
        tokenizer = getattr(self.pipe, "tokenizer", None)
        self.max_sequence_length = min(226, getattr(tokenizer, "model_max_length", 226) or 226)

    def frames_of(self, req: MediaRequest) -> int:
        return req.num_frames or self.default_frames

    def batch_key(self, req: MediaRequest) -> tuple:
        return super().batch_key(req) + (self.frames_of(req),)

    def generate(self, prompts: list[str], first: MediaRequest, kwargs: dict) -> list:
        return self.pipe(prompt=prompts, num_frames=self.frames_of(first), output_type="pil",
                         max_sequence_length=self.max_sequence_length, **kwargs).frames

    def encode(self, frames, req: MediaRequest) -> MediaFile:
        import imageio_ffmpeg
        import numpy as np

        fd, path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
        try:
            width, height = frames[0].size
            # yuv420p at even sizes plays everywhere; odd sizes are padded by ffmpeg.
            writer = imageio_ffmpeg.write_frames(path, (width, height), fps=req.fps, codec="libx264",
                                                 pix_fmt_out="yuv420p", macro_block_size=2, quality=7)
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(np.asarray(frame.convert("RGB"), dtype=np.uint8)))
            writer.close()
            with open(path, "rb") as f:
                return MediaFile(f.read(), "video/mp4")
        finally:
            os.unlink(path)
