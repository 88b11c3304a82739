"""Admin: the workers and host supervisors of the deployment, and switching a host
between independent workers and a tensor-parallel group (``inferstack.host``). The
API talks to a host's supervisor through Redis only: it queues the change on the
host's command list and the supervisor reports progress in its status."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.errors import OpenAIError
from api.routes._text import require_admin, state_of
from api.schemas import ModeChangeRequest
from api.workers import host_status, live_hosts, live_workers, send_mode_change
from broker.messages import HostMode, ModeChange
from inferstack.host import ModeError, check_mode

router = APIRouter()

WORKER_FIELDS = ("id", "host_id", "host", "pid", "mode", "tp_size", "devices", "device", "models", "states",
                 "can_load", "state", "running", "started_at", "heartbeat_at")


@router.get("/v1/admin/workers")
async def list_workers(request: Request):
    """Every live worker (a tensor-parallel group shows as its rank 0) with its mode,
    devices and models."""
    state = state_of(request)
    require_admin(request, state)
    workers = sorted(await live_workers(state.redis), key=lambda w: (str(w.get("host_id", "")), str(w.get("id"))))
    return {"object": "list", "data": [{k: w[k] for k in WORKER_FIELDS if k in w} for w in workers]}


@router.get("/v1/admin/hosts")
async def list_hosts(request: Request):
    state = state_of(request)
    require_admin(request, state)
    hosts = sorted(await live_hosts(state.redis), key=lambda h: str(h.get("host_id")))
    return {"object": "list", "data": hosts}


async def _host(request: Request, host: str) -> dict:
    status = await host_status(state_of(request).redis, host)
    if status is None:
        raise OpenAIError(404, f"No live host supervisor named `{host}` (`inferstack host` runs one; "
                          "GET /v1/admin/hosts lists them).", param="host", code="host_not_found")
    return status


@router.get("/v1/admin/hosts/{host}")
async def get_host(host: str, request: Request):
    """The host's status: devices, mode, its workers, and the last mode change
    (``command``, ``command_state``: running, done or failed, with ``error``)."""
    require_admin(request, state_of(request))
    return await _host(request, host)


@router.post("/v1/admin/hosts/{host}/mode", status_code=202)
async def change_mode(host: str, body: ModeChangeRequest, request: Request):
    """Queue a mode change for the host's supervisor; answers 202 at once. Follow it
    with GET /v1/admin/hosts/{host} until ``command`` is this id and ``command_state``
    is ``done`` (or ``failed``, with ``error``)."""
    state = state_of(request)
    require_admin(request, state)
    status = await _host(request, host)
    mode = HostMode(body.mode)
    try:
        model, size = check_mode(state.catalog.registry, status.get("devices", []), mode, body.model, body.size)
    except ModeError as exc:
        raise OpenAIError(400, f"{exc}.", param=exc.param, code="invalid_value") from None
    change = ModeChange(f"mode-{uuid.uuid4().hex[:16]}", mode, model, size or None, time.time())
    await send_mode_change(state.redis, host, change)
    return JSONResponse({"id": change.id, "object": "host.mode_change", "host": host, "mode": str(mode),
                         "model": model, "size": size or None, "status": "queued"}, status_code=202)
