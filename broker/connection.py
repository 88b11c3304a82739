"""Redis connections. One URL (``INFERSTACK_REDIS_URL``), sync clients for workers
and tools, asyncio clients for the API.

Every client retries a failed command a few times with redis-py's jittered
exponential backoff (a blip, a failover), then raises: riding out a longer outage is
each component's own loop (``Outage`` below), which knows what it may hold meanwhile.
A command retried after a dropped reply may run twice, so the scripts that change
state are idempotent (enqueue) or fenced by lease owner (emit, complete).
"""

from __future__ import annotations

import logging
import time

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)
"""What an unreachable (or restarting, still loading) Redis raises; ``BusyLoadingError``
is a ``ConnectionError``."""

_COMMAND_RETRIES = 3
_OPTIONS = dict(decode_responses=True, health_check_interval=30, socket_connect_timeout=2.0, socket_keepalive=True)


def backoff() -> EqualJitterBackoff:
    """Pause before the next reconnect attempt: about 50 ms doubling to 1 s, jittered
    (between half and all of it), so clients coming back together do not arrive in
    lockstep, and a returning Redis is found within a second."""
    return EqualJitterBackoff(cap=1.0, base=0.05)


def _command_backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=0.25, base=0.02)


def sync_client(url: str, **kw) -> redis.Redis:
    kw.setdefault("retry", Retry(_command_backoff(), _COMMAND_RETRIES))
    return redis.Redis.from_url(url, **{**_OPTIONS, **kw})


def async_client(url: str, **kw) -> aioredis.Redis:
    kw.setdefault("retry", AsyncRetry(_command_backoff(), _COMMAND_RETRIES))
    return aioredis.Redis.from_url(url, **{**_OPTIONS, **kw})


class Outage:
    """One component's view of whether Redis answers: logs the first failure and the
    recovery (not every retry), says how long the outage has lasted, and paces the
    retries with :func:`backoff`."""

    def __init__(self, what: str, logger: logging.Logger):
        self.what = what
        self.log = logger
        self.since: float | None = None
        """Monotonic time of the first failure of the current outage (None: Redis answers)."""
        self.failures = 0
        self._backoff = backoff()

    @property
    def down(self) -> bool:
        return self.since is not None

    def elapsed(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def failed(self, exc: BaseException) -> float:
        """Note a failure; returns the pause before the next attempt."""
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning("%s: Redis unavailable (%s); retrying", self.what, exc or type(exc).__name__)
        return self._backoff.compute(self.failures)

    def ok(self) -> float | None:
        """Note a success; returns how long the outage that just ended lasted, if one did."""
        if self.since is None:
            return None
        lasted = time.monotonic() - self.since
        self.since, self.failures = None, 0
        self._backoff.reset()
        self.log.warning("%s: Redis is back after %.1f s", self.what, lasted)
        return lasted
