"""Reading the workers' heartbeats and the host supervisors' statuses
(``inferstack.host``), and sending host supervisors mode changes."""

from __future__ import annotations

import time

from broker import keys, messages
from broker.messages import ModeChange, decode_heartbeat

LIVE_WINDOW_S = 5.0


async def _live(redis, index: str, key) -> list[dict]:
    ids = await redis.zrangebyscore(index, time.time() - LIVE_WINDOW_S, "+inf")
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for one in ids:
        pipe.hgetall(key(one))
    # An empty hash: the key expired, its process is gone.
    return [decode_heartbeat(raw) for raw in await pipe.execute() if raw]


async def live_workers(redis) -> list[dict]:
    return await _live(redis, keys.WORKERS, keys.worker)


async def live_hosts(redis) -> list[dict]:
    return await _live(redis, keys.HOSTS, keys.host)


async def host_status(redis, host_id: str) -> dict | None:
    raw = await redis.hgetall(keys.host(host_id))
    return decode_heartbeat(raw) if raw else None


async def send_mode_change(redis, host_id: str, change: ModeChange) -> None:
    await redis.rpush(keys.host_commands(host_id), messages.encode(change))


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
    hosts = await live_hosts(redis)
    if any(spec.name in (h.get("model"), h.get("command_model")) for h in hosts):
        return  # a host runs, or is switching to, a tensor-parallel group for it
    if spec.tensor_parallel > 1:
        able = [h["host_id"] for h in hosts if len(h.get("devices", [])) >= spec.tensor_parallel]
        raise OpenAIError(
            503, f"`{spec.name}` runs as a tensor-parallel group of {spec.tensor_parallel} devices and no host runs "
            "one. An admin can switch a host to it: POST /v1/admin/hosts/{host}/mode with "
            f'{{"mode": "tp", "model": "{spec.name}"}}, or `inferstack mode HOST tp --model {spec.name}`'
            + (f" (hosts with enough devices: {', '.join(able)})." if able else "; no live host has enough devices."),
            type="server_error", param="model", code="no_capable_worker")
    largest = max(int(w.get("model_capacity_bytes", 0)) for w in workers) / (1 << 30)
    raise OpenAIError(
        503, f"No worker of this deployment can hold `{spec.name}` (needs about {spec.memory_gb:g} GiB"
        + (f" on {spec.device}" if spec.device != "any" else "")
        + f"; the largest worker can give models {largest:.1f} GiB, or lacks its weights). "
        "Add a worker that can serve it.", type="server_error", param="model", code="no_capable_worker")
