"""Redis connections: sync clients for workers and tools, asyncio clients for the API,
to one of three deployments, chosen by ``INFERSTACK_REDIS_MODE``:

* ``standalone``: one Redis (``redis://host:6379/0``, as before);
* ``sentinel``: a primary that Sentinel watches and replaces. The URL names the
  sentinels (``redis://[:password@]s1:26379,s2:26379/0``; the password is the
  primary's), ``INFERSTACK_REDIS_SENTINEL_MASTER`` the service;
* ``cluster``: a Redis Cluster. The URL names some of its nodes
  (``redis://[:password@]n1:6379,n2:6379``); the client learns the rest and follows
  slots as they move (failovers, resharding).

Everything the stack does works in all three: each queue script touches one model's
hash slot (``scheduler.keys``), nothing blocks on keys of two slots, and pub/sub uses
sharded channels (``SPUBLISH``/``SSUBSCRIBE``), which a Cluster keeps on the shard that
owns the channel's slot instead of broadcasting to every node. rq (media jobs) cannot
use a Cluster: it gets its own URL (``INFERSTACK_RQ_REDIS_URL``), standalone or sentinel.

Every client retries a failed command a few times (a blip, a failover: jittered
exponential backoff on one Redis or a Sentinel-managed primary; on a Cluster,
redis-py's own retries, which read the slot map again between tries), then raises:
riding out a longer outage is each component's own loop (``Outage`` below), which
knows what it may hold meanwhile. A command retried after a dropped reply may run
twice, so the scripts that change state are idempotent (enqueue) or fenced by lease
owner (emit, complete).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import ClusterNode, RedisCluster, key_slot
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.backoff import EqualJitterBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError)
"""What a Redis that is unreachable, restarting or failing over raises: a primary gone,
a Cluster slot without a primary until a replica takes it over, a Sentinel-managed
client still finding the new primary (redis-py raises ``ConnectionError`` then), a
restarted Redis still loading its data (``BusyLoadingError`` is a ``ConnectionError``)."""

log = logging.getLogger(__name__)

_COMMAND_RETRIES = 3
_OPTIONS = dict(decode_responses=True, health_check_interval=30, socket_connect_timeout=2.0, socket_keepalive=True)
_SENTINEL_OPTIONS = dict(socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True)
"""Sentinels answer a question or are skipped for the next one: never wait long on one."""


def backoff() -> EqualJitterBackoff:
    """Pause before the next reconnect attempt: about 50 ms doubling to 1 s, jittered
    (between half and all of it), so clients coming back together do not arrive in
    lockstep, and a returning Redis is found within a second."""
    return EqualJitterBackoff(cap=1.0, base=0.05)


def _command_backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=0.25, base=0.02)


class RedisMode(StrEnum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True)
class RedisTarget:
    """Where a component's Redis is and what kind it is (``CommonSettings.redis``)."""

    url: str
    mode: RedisMode = RedisMode.STANDALONE
    sentinel_master: str = "mymaster"


@dataclass(frozen=True)
class _Parsed:
    hosts: list[tuple[str, int]]
    options: dict


def _parse(url: str, default_port: int) -> _Parsed:
    """``redis[s]://[user:password@]h1[:p1],h2[:p2][/db]``: several hosts, which
    ``redis.from_url`` does not take."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    if "?" in rest:
        raise ValueError(f"options (?...) are taken in standalone mode only: {url!r}")
    userinfo, _, rest = rest.rpartition("@")
    netloc, _, path = rest.partition("/")
    options: dict = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            options["username"] = unquote(user)
        if password:
            options["password"] = unquote(password)
    if path.strip("/"):
        options["db"] = int(path.strip("/"))
    if scheme == "rediss":
        options["ssl"] = True
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        hosts.append((host or part, int(port) if port else default_port))
    return _Parsed(hosts, options)


class _SentinelManaged(redis.Redis):
    """The client of a Sentinel-managed primary; closing it closes its sentinel links too."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            sentinel.close()


class _AsyncSentinelManaged(aioredis.Redis):
    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()


@dataclass(frozen=True)
class _Kind:
    """The redis-py classes of one flavour (sync or asyncio) for each mode."""

    plain: type
    sentinel: type
    sentinel_managed: type
    cluster: type
    cluster_node: type
    retry: type


_SYNC = _Kind(redis.Redis, Sentinel, _SentinelManaged, RedisCluster, ClusterNode, Retry)
_ASYNC = _Kind(aioredis.Redis, AsyncSentinel, _AsyncSentinelManaged, AsyncRedisCluster, AsyncClusterNode, AsyncRetry)


def _client(kind: _Kind, target: RedisTarget | str, kw: dict):
    target = RedisTarget(target) if isinstance(target, str) else target
    kw = {**_OPTIONS, **kw}
    if target.mode is not RedisMode.CLUSTER:  # (a Cluster client takes no per-connection retry)
        kw.setdefault("retry", kind.retry(_command_backoff(), _COMMAND_RETRIES))
    if target.mode is RedisMode.STANDALONE:
        return kind.plain.from_url(target.url, **kw)
    if target.mode is RedisMode.SENTINEL:
        p = _parse(target.url, 26379)
        sentinel = kind.sentinel(p.hosts, sentinel_kwargs=_SENTINEL_OPTIONS)
        return sentinel.master_for(target.sentinel_master, redis_class=kind.sentinel_managed, **{**p.options, **kw})
    p = _parse(target.url, 6379)
    p.options.pop("db", None)  # a Cluster has database 0 only
    return kind.cluster(startup_nodes=[kind.cluster_node(h, port) for h, port in p.hosts], **{**p.options, **kw})


def sync_client(target: RedisTarget | str, **kw) -> redis.Redis | RedisCluster:
    """A client for ``target`` (a bare URL means standalone). ``decode_responses=False``
    for bytes (rq)."""
    return _client(_SYNC, target, kw)


def async_client(target: RedisTarget | str, **kw) -> aioredis.Redis | AsyncRedisCluster:
    return _client(_ASYNC, target, kw)


MIN_VERSION = (7, 0)
"""Sharded pub/sub (``SPUBLISH``) and script flags (``#!lua``) arrived in Redis 7.0."""


def _too_old(info: dict) -> str | None:
    version = str(info.get("redis_version", "0"))
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_VERSION:
        return (f"Redis {version} is too old: Inference Stack needs Redis {'.'.join(map(str, MIN_VERSION))} or "
                "later (sharded pub/sub, script flags); upgrade redis-server")
    return None


def check_server(client) -> None:
    """Refuse a Redis older than 7.0 with a message that says so. One that does not
    answer yet is not refused here: the components wait for it."""
    try:
        problem = _too_old(client.info("server"))
    except UNAVAILABLE:
        return
    if problem:
        raise RuntimeError(problem)


async def acheck_server(client) -> None:
    try:
        problem = _too_old(await client.info("server"))
    except UNAVAILABLE:
        return
    if problem:
        raise RuntimeError(problem)


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


def is_cluster(client) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def server_ids(client) -> frozenset[str]:
    """The run ids of the primaries (one, or each of a Cluster's): one that changes
    means a restart or a failover, either of which may have lost the last writes (an
    AOF synced every second, a replica behind its primary)."""
    if isinstance(client, RedisCluster):
        infos = client.info("server", target_nodes=RedisCluster.PRIMARIES)
        infos = [infos] if "run_id" in infos else infos.values()  # (one primary: its answer alone)
        return frozenset(info["run_id"] for info in infos)
    return frozenset({client.info("server")["run_id"]})


# -- sharded pub/sub --------------------------------------------------------------

def subscription_groups(client, channels) -> list[list[str]]:
    """Channels to read promptly, grouped so that each group can be one subscription
    read by one loop: all of them on one Redis; one group per hash slot on a Cluster
    (its client reads each node's subscriptions on a connection of their own and, with
    several, polls them in turn, a timeout each)."""
    channels = list(channels)
    if not is_cluster(client):
        return [channels] if channels else []
    groups: dict[int, list[str]] = {}
    for channel in channels:
        groups.setdefault(key_slot(channel.encode()), []).append(channel)
    return list(groups.values())


def refresh_topology(client) -> None:
    """After a subscription or a pipeline failed on a Cluster: make the client read the
    slot map again, so the next try goes to whoever serves the slot now. A single
    command does that by itself when its node fails; a subscription does not, and
    neither does a pipeline (redis-py's would go on sending to a dead primary after
    its replica took over). Never raises: while the cluster still elects, the next
    failure reads it again."""
    if isinstance(client, RedisCluster):
        try:
            client.nodes_manager.initialize()
        except Exception:  # noqa: BLE001
            log.debug("slot map not read (cluster still failing over?)", exc_info=True)


async def arefresh_topology(client) -> None:
    """:func:`refresh_topology` for asyncio clients."""
    if isinstance(client, AsyncRedisCluster):
        try:
            await client.nodes_manager.initialize()
        except Exception:  # noqa: BLE001
            log.debug("slot map not read (cluster still failing over?)", exc_info=True)


async def ainitialize(client) -> None:
    """An asyncio Cluster client learns the slot map on its first command; a
    subscription needs it before that."""
    if isinstance(client, AsyncRedisCluster):
        await client.initialize()


class SubscriptionLost(Exception):
    """The server ended a sharded subscription: its slot moved to another node (a
    failover, a reshard). Subscribe again (after ``refresh_topology``); what was
    published meanwhile is lost to this subscriber."""


def _sharded(pubsub, msg):
    if msg is None or msg["type"] == "ssubscribe":
        return None
    if msg["type"] == "sunsubscribe":
        # One we asked for is no longer in shard_channels (redis-py drops it on the
        # confirmation); one the server ended is.
        if msg["channel"] in pubsub.shard_channels:
            raise SubscriptionLost(f"{msg['channel']}: the server ended the subscription (its slot moved)")
        return None
    return msg


def next_message(pubsub, timeout: float):
    """The next sharded message (``type == "smessage"``) or None, on any client kind;
    raises :class:`SubscriptionLost` when the server ended a subscription."""
    if hasattr(pubsub, "get_sharded_message"):
        return _sharded(pubsub, pubsub.get_sharded_message(timeout=timeout))
    return _sharded(pubsub, pubsub.get_message(timeout=timeout))


async def anext_message(pubsub, timeout: float):
    """:func:`next_message` for asyncio clients."""
    if hasattr(pubsub, "get_sharded_message"):
        return _sharded(pubsub, await pubsub.get_sharded_message(timeout=timeout))
    return _sharded(pubsub, await pubsub.get_message(timeout=timeout))
