"""Redis connections. One URL (``INFERSTACK_REDIS_URL``), sync clients for workers
and tools, asyncio clients for the API."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis


def sync_client(url: str, **kw) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **kw)


def async_client(url: str, **kw) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True, health_check_interval=30, **kw)
