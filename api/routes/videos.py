"""POST /v1/videos/generations: text-to-video, async only (202 + Location; poll
GET /v1/jobs/{id}, fetch the MP4 from its result URL)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from api.routes._text import state_of
from api.routes.media import accepted, media_spec, parse_size
from api.schemas import VideoGenerationRequest
from broker.messages import MediaRequest
from inferstack.registry import Modality

router = APIRouter()


@router.post("/v1/videos/generations", status_code=202)
async def generate_video(body: VideoGenerationRequest, request: Request):
    state = state_of(request)
    identity = state.keys.identify(request.headers.get("authorization"), body.user)
    spec = await media_spec(state, body.model, Modality.VIDEO)
    width, height = parse_size(body.size, spec.extra.get("size", "720x480"))
    req = MediaRequest(
        id=f"vid-{uuid.uuid4().hex}", model=spec.name, prompt=body.prompt, negative_prompt=body.negative_prompt,
        width=width, height=height, steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
        num_frames=body.num_frames, fps=body.fps, user=identity.user, tier=identity.with_priority(body.priority),
        created_at=time.time(),
    )
    job = await state.jobs.submit(req, identity, "video")
    return await accepted(state, job, request)
