"""Reading the workers' heartbeats."""

from __future__ import annotations

import json
import time

from broker import keys

LIVE_WINDOW_S = 5.0


async def live_workers(redis) -> list[dict]:
    ids = await redis.zrangebyscore(keys.WORKERS, time.time() - LIVE_WINDOW_S, "+inf")
    if not ids:
        return []
    pipe = redis.pipeline(transaction=False)
    for wid in ids:
        pipe.hgetall(keys.worker(wid))
    out = []
    for raw in await pipe.execute():
        if not raw:
            continue  # heartbeat key expired: the worker is gone
        info = {}
        for k, v in raw.items():
            try:
                info[k] = json.loads(v)
            except ValueError:
                info[k] = v
        out.append(info)
    return out


async def served_models(redis) -> dict[str, int]:
    """Model name -> number of live workers serving it."""
    served: dict[str, int] = {}
    for w in await live_workers(redis):
        for m in w.get("models", []):
            served[m] = served.get(m, 0) + 1
    return served
