"""/health, /ready, /v1/models. With keys, only /health answers without one (``key_gate``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.errors import model_not_found
from api.routes._text import state_of
from api.workers import live_workers, served_models

router = APIRouter()


@router.get("/health")
async def health():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """Readiness: Redis answers and at least one live worker serves some model."""
    state = state_of(request)
    try:
        await state.redis.ping()
    except Exception as exc:  # noqa: BLE001
        return JSONResponse({"status": "unavailable", "reason": f"redis: {type(exc).__name__}"}, status_code=503)
    workers = await live_workers(state.redis)
    models = sorted({m for w in workers for m in w.get("models", [])})
    if not models:
        return JSONResponse({"status": "unavailable", "reason": "no live worker"}, status_code=503)
    return {"status": "ready", "workers": len(workers), "models": models}


def _model_card(name: str, created: int = 0) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "inferstack"}


@router.get("/v1/models")
async def list_models(request: Request):
    served = await served_models(state_of(request).redis)
    return {"object": "list", "data": [_model_card(m) for m in sorted(served)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    served = await served_models(state_of(request).redis)
    if model not in served:
        raise model_not_found(model)
    return _model_card(model)
