"""POST /v1/images/generations: synchronous within INFERSTACK_IMAGE_WAIT_S by default
(OpenAI's shape), or an async job with ``"async": true`` (202 + Location)."""

from __future__ import annotations

import base64
import time
import uuid

from fastapi import APIRouter, Request

from api.errors import OpenAIError
from api.routes._text import state_of
from api.routes.media import accepted, media_spec, parse_size
from api.schemas import ImageGenerationRequest
from broker.messages import MediaRequest
from inferstack.registry import Modality

router = APIRouter()


@router.post("/v1/images/generations")
async def generate_images(body: ImageGenerationRequest, request: Request):
    state = state_of(request)
    identity = state.keys.identify(request.headers.get("authorization"), body.user)
    spec = await media_spec(state, body.model, Modality.IMAGE)
    if body.n > spec.max_batch:
        raise OpenAIError(400, f"n must be at most {spec.max_batch} for `{spec.name}`.", param="n", code="invalid_value")
    width, height = parse_size(body.size, spec.extra.get("size", "512x512"))
    req = MediaRequest(
        id=f"img-{uuid.uuid4().hex}", model=spec.name, prompt=body.prompt, negative_prompt=body.negative_prompt,
        n=body.n, width=width, height=height, steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
        response_format=body.response_format, user=identity.user, tier=identity.with_priority(body.priority),
        created_at=time.time(),
    )
    wait = not body.async_
    job = await state.jobs.submit(req, identity, "image", wait=wait)
    if wait:
        status = await state.jobs.wait(job, state.settings.image_wait_s)
        if status == "succeeded":
            return await images_response(state, job, body.response_format, str(request.base_url))
        if status in ("failed", "cancelled"):
            view = await state.jobs.view(job, str(request.base_url))
            message = (view["error"] or {}).get("message", "the job was cancelled")
            raise OpenAIError(500, f"Image generation {status}: {message}", type="server_error", code=f"job_{status}")
    return await accepted(state, job, request)


async def images_response(state, job, response_format: str, base_url: str) -> dict:
    files = await state.jobs.files(job)
    if response_format == "url":
        data = [{"url": state.jobs.file_url(job, i, base_url), "revised_prompt": None} for i in range(len(files))]
    else:
        data = [{"b64_json": base64.b64encode(content).decode(), "revised_prompt": None} for content, _ in files]
    return {"created": int(job.created_at.timestamp()), "data": data}


