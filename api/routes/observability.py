"""GET /metrics (Prometheus) and GET /v1/stats (per model and tenant, from the metrics
store): both admin only, since they show every tenant's traffic."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.errors import OpenAIError
from api.routes._text import require_admin, state_of
from metrics import prom, stats
from metrics.store import open_store

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request):
    """This process's counters and histograms (all API processes' in multiprocess mode).
    The queue depth is not here: it is deployment-wide, and the exporter serves it once
    (``metrics/prom.py``). Admin only; Prometheus sends the key with
    ``authorization: {credentials: ...}`` in its scrape config."""
    require_admin(request, state_of(request))
    return Response(prom.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/stats")
async def get_stats(request: Request, window: str = "1h", model: str = ""):
    """Per model and per tenant over the last ``window`` (``90s``, ``15m``, ``1h``, ``7d``)."""
    state = state_of(request)
    require_admin(request, state)
    try:
        window_s = stats.parse_window(window)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="window", code="invalid_value") from None
    try:
        if state.stats_store is None:
            state.stats_store = await asyncio.to_thread(open_store, state.settings)
        return await asyncio.to_thread(stats.stats, state.stats_store, window_s, model=model)
    except Exception as exc:  # noqa: BLE001
        raise OpenAIError(503, f"The metrics store is unavailable: {exc}", type="server_error",
                          code="metrics_unavailable") from exc
