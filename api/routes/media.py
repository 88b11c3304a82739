"""What the image, video and speech routes share: finding the model, sizes, and the
202 answer for a job."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse

from api.auth import ANONYMOUS
from api.errors import OpenAIError
from api.workers import check_servable
from inferstack.registry import Modality, ModelSpec


async def media_spec(state, name: str | None, modality: Modality) -> ModelSpec:
    """The registry entry for a media request (the first model of the modality when the
    request names none), refused if it is another modality or no worker could serve it."""
    if name is None:
        name = next((s.name for s in state.catalog.registry if s.modality is modality), None)
        if name is None:
            raise OpenAIError(404, f"No {modality} model is registered here.", param="model", code="model_not_found")
    spec = state.catalog.spec(name)
    if spec.modality is not modality:
        raise OpenAIError(400, f"`{name}` is a {spec.modality} model; this endpoint needs a {modality} model.",
                          param="model", code="model_not_supported")
    await check_servable(state.redis, spec)
    return spec


def parse_size(size: str | None, default: str) -> tuple[int, int]:
    text = default if size in (None, "auto") else size
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise OpenAIError(400, f"size must look like 512x512, not {size!r}.", param="size", code="invalid_value") from None
    if not (8 <= width <= 2048 and 8 <= height <= 2048 and width % 8 == 0 and height % 8 == 0):
        raise OpenAIError(400, "width and height must be multiples of 8 between 8 and 2048.", param="size",
                          code="invalid_value")
    return width, height


async def accepted(state, job, request: Request) -> JSONResponse:
    """202 with the job and where to poll it. In open mode the owner is the request's
    ``user`` field, which a GET has no body to carry: the Location names it."""
    view = await state.jobs.view(job, str(request.base_url))
    location = f"/v1/jobs/{job.id}"
    user = job.meta.get("user")
    if state.keys.open and user and user != ANONYMOUS:
        location += f"?user={quote(user, safe='')}"
    return JSONResponse(view, status_code=202, headers={"Location": location})
