"""One pub/sub listener per API process, fanning events out to per-request queues.

The process has one reply channel per model (``scheduler.keys.reply_channel``: a
sharded channel in the model's hash slot, so a worker's events travel to the node
that holds the model's queue, together with its output-log appends). It subscribes
to all of them at start-up, before any request is enqueued, so no event can be
published before someone listens: one subscription on one Redis (standalone or
Sentinel-managed), one per hash slot on a Cluster.

A subscription can be lost in three ways, handled as one: Redis does not answer (a
restart, a network blip, a primary that died), the server ends it because its slot
moved to another node (a Cluster failover: ``SubscriptionLost``), or anything else
goes wrong. The relay then wakes the readers of that subscription's requests with
``None`` (they read the requests' output logs, and poll them while it is down:
``outage_s``), subscribes again with backoff (on a Cluster after reading the slot
map again, so it goes to the node that serves the slot now) and wakes them once more
when it is back: what was published meanwhile is in the logs (``api.generation``).
redis-py also reconnects and resubscribes on its own after a short blip; that is
noticed through the connection's connect callback and answered the same way."""

from __future__ import annotations

import asyncio
import logging

from broker import messages
from broker.connection import (UNAVAILABLE, Outage, RedisTarget, SubscriptionLost, ainitialize, anext_message,
                               arefresh_topology, async_client, subscription_groups)
from scheduler import keys

log = logging.getLogger(__name__)


class TokenRelay:
    def __init__(self, target: RedisTarget | str, instance_id: str, models: list[str]):
        self.instance_id = instance_id
        self.channels = {model: keys.reply_channel(model, instance_id) for model in models}
        self._client = async_client(target)
        self._queues: dict[str, list[asyncio.Queue]] = {}
        self._tasks: list[asyncio.Task] = []
        self._outages: dict[str, Outage] = {}
        """Reply channel -> the state of the subscription that carries it."""
        self.reconnects = 0

    def channel_for(self, model: str) -> str:
        """Where workers send the events of this process's requests for ``model``."""
        return self.channels[model]

    def hears(self, channel: str) -> bool:
        """Whether events published on ``channel`` reach this process."""
        return channel in self._outages

    def outage_s(self, channel: str) -> float:
        """How long the subscription carrying ``channel`` has been down (0: it is up)."""
        outage = self._outages.get(channel)
        return 0.0 if outage is None else outage.elapsed()

    async def start(self) -> None:
        await ainitialize(self._client)
        groups = subscription_groups(self._client, self.channels.values())
        ready = [asyncio.Event() for _ in groups]
        for group in groups:
            outage = Outage(f"token relay {self.instance_id} ({len(group)} channels from {group[0]})", log)
            self._outages.update((channel, outage) for channel in group)
        self._tasks = [asyncio.create_task(self._listen(group, ev, self._outages[group[0]]), name="token-relay")
                       for group, ev in zip(groups, ready)]
        await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in ready)), timeout=10)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self._client.aclose()

    def register(self, request_id: str) -> asyncio.Queue:
        """A new queue for ``request_id``'s events (several readers may follow one
        request: a client that resumed its stream while its old connection lingers)."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues.setdefault(request_id, []).append(q)
        return q

    def unregister(self, request_id: str, q: asyncio.Queue | None = None) -> None:
        """Stop delivering to ``q`` (all of the request's queues when None)."""
        queues = self._queues.get(request_id)
        if queues is None:
            return
        if q is not None and q in queues:
            queues.remove(q)
        if q is None or not queues:
            del self._queues[request_id]

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def _resubscribed(self, _connection) -> None:
        self.reconnects += 1
        self._wake_all()

    def _wake_all(self) -> None:
        """Events may have gone by unheard: readers check the output log for gaps."""
        for queues in self._queues.values():
            for q in queues:
                q.put_nowait(None)

    def dispatch(self, data: bytes) -> None:
        """One published batch (a worker's step) to the queues of the requests it names."""
        for event in messages.decode_batch(data):
            for q in self._queues.get(event.request_id, ()):
                q.put_nowait(event)

    async def _listen(self, channels: list[str], ready: asyncio.Event, outage: Outage) -> None:
        while True:
            pubsub = self._client.pubsub()
            connection = None
            try:
                await pubsub.ssubscribe(*channels)
                connection = getattr(pubsub, "connection", None)  # (a Cluster's has one per node)
                if connection is not None:
                    connection.register_connect_callback(self._resubscribed)
                ready.set()
                if outage.ok() is not None:
                    self.reconnects += 1
                    self._wake_all()  # subscribed again: what was published meanwhile is in the logs
                while True:
                    msg = await anext_message(pubsub, timeout=1.0)
                    if msg is not None and msg["type"] == "smessage":
                        self.dispatch(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - subscribe again; gaps are refilled from the output log
                if not isinstance(exc, (*UNAVAILABLE, SubscriptionLost)):
                    log.exception("token relay failed; subscribing again")
                first = not outage.down
                pause = outage.failed(exc)
                if first:
                    self._wake_all()  # readers read the logs, and poll them until it is back
                await asyncio.sleep(pause)
            finally:
                if connection is not None:
                    connection.deregister_connect_callback(self._resubscribed)
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
            await arefresh_topology(self._client)  # a Cluster: subscribe where the slot is now
