"""Reading the workers' heartbeats."""

from __future__ import annotations

import time

from broker import keys
from broker.messages import decode_heartbeat

LIVE_WINDOW_S = 5.0


async def live_workers(redis) -> list[dict]:
    ids = await redis.zrangebyscore(keys.WORKERS, time.time() - LIVE_WINDOW_S, "+inf")
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for wid in ids:
        pipe.hgetall(keys.worker(wid))
    # An empty hash: the heartbeat key expired, the worker is gone.
    return [decode_heartbeat(raw) for raw in await pipe.execute() if raw]


async def served_models(redis) -> dict[str, int]:
    """Model name -> number of live workers serving it, or able to load it on demand."""
    served: dict[str, int] = {}
    for w in await live_workers(redis):
        for m in set(w.get("models", [])) | set(w.get("can_load", [])):
            served[m] = served.get(m, 0) + 1
    return served


async def check_servable(redis, spec) -> None:
    """Queue work for any registered model some worker serves, is loading, or could load
    on demand; refuse only when live workers that know the model exist and none of them
    could ever hold it. With no such worker the request queues: one may be starting."""
    from api.errors import OpenAIError

    # Only workers whose registry has the model have a say: during a registry rollout (or
    # with several deployments on one Redis) the others know nothing about it.
    workers = [w for w in await live_workers(redis) if spec.name in w.get("registry", [])]
    if not workers:
        return
    for w in workers:
        if spec.name in w.get("models", []) or spec.name in w.get("states", {}) or spec.name in w.get("can_load", []):
            return
    largest = max(int(w.get("model_capacity_bytes", 0)) for w in workers) / (1 << 30)
    raise OpenAIError(
        503, f"No worker of this deployment can hold `{spec.name}` (needs about {spec.memory_gb:g} GiB"
        + (f" on {spec.device}" if spec.device != "any" else "")
        + f"; the largest worker can give models {largest:.1f} GiB, or lacks its weights). "
        "Add a worker that can serve it.", type="server_error", param="model", code="no_capable_worker")
