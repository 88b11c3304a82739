"""One pub/sub listener per API process, fanning events out to per-request queues.

The process has one reply channel per model (``scheduler.keys.reply_channel``: a
sharded channel in the model's hash slot, so a worker's events travel to the node
that holds the model's queue, together with its output-log appends). It subscribes
to all of them at start-up, before any request is enqueued, so no event can be
published before someone listens."""

from __future__ import annotations

import asyncio
import logging

from broker import messages
from broker.connection import (RedisTarget, ainitialize, anext_message, arefresh_topology, async_client,
                               subscription_groups)
from scheduler import keys

log = logging.getLogger(__name__)


class TokenRelay:
    def __init__(self, target: RedisTarget | str, instance_id: str, models: list[str]):
        self.instance_id = instance_id
        self.channels = {model: keys.reply_channel(model, instance_id) for model in models}
        self._client = async_client(target)
        self._queues: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self.reconnects = 0

    def channel_for(self, model: str) -> str:
        """Where workers send the events of this process's requests for ``model``."""
        return self.channels[model]

    async def start(self) -> None:
        await ainitialize(self._client)
        groups = subscription_groups(self._client, self.channels.values())
        ready = [asyncio.Event() for _ in groups]
        self._tasks = [asyncio.create_task(self._listen(group, ev), name="token-relay")
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
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        return q

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._queues)

    def _wake_readers(self) -> None:
        """Events may have gone by unheard: readers check the output log for gaps."""
        for q in self._queues.values():
            q.put_nowait(None)

    async def _listen(self, channels: list[str], ready: asyncio.Event) -> None:
        lost = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.ssubscribe(*channels)
                ready.set()
                if lost:  # what was published while nobody listened is in the logs by now
                    self._wake_readers()
                    lost = False
                while True:
                    msg = await anext_message(pubsub, timeout=1.0)
                    if msg is None or msg["type"] != "smessage":
                        continue
                    for event in messages.decode_batch(msg["data"]):
                        q = self._queues.get(event.request_id)
                        if q is not None:
                            q.put_nowait(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - resubscribe; gaps are refilled from the output log
                self.reconnects += 1
                lost = True
                log.exception("token relay lost its subscription; resubscribing")
                self._wake_readers()
                await asyncio.sleep(0.2)
                try:
                    await arefresh_topology(self._client)
                except Exception:  # noqa: BLE001 - the cluster is still electing; next round
                    pass
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
