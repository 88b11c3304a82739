"""GET /v1/jobs/{id}, DELETE /v1/jobs/{id}, GET /v1/jobs/{id}/content/{index}"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.errors import OpenAIError
from api.routes._text import caller, state_of

router = APIRouter()


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request):
    jobs = state_of(request).jobs
    job = await jobs.get(job_id, caller(request))
    return await jobs.view(job, str(request.base_url))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    jobs = state_of(request).jobs
    job = await jobs.get(job_id, caller(request))
    await jobs.cancel(job)
    return await jobs.view(job, str(request.base_url))


@router.get("/v1/jobs/{job_id}/content/{index}")
async def job_content(job_id: str, index: int, request: Request):
    """A result file. The ``token`` in the job's result URLs grants access on its own
    (like a presigned URL, so an <img> tag can load it); otherwise the owner's key."""
    state = state_of(request)
    token = request.query_params.get("token")
    identity = None if token else caller(request)
    job = await state.jobs.get(job_id, identity, token=token)
    files = await state.jobs.files(job) if state.jobs.status(job) == "succeeded" else []
    if not 0 <= index < len(files):
        raise OpenAIError(404, f"Job '{job_id}' has no result file {index} (yet, or any more).",
                          type="not_found_error", code="file_not_found")
    data, media_type = files[index]
    return Response(data, media_type=media_type)
