"""One pub/sub listener per API process, fanning token events out to per-request
queues. The process subscribes to its reply channel once, at start-up, before any
request is enqueued, so no event can be published before someone listens."""

from __future__ import annotations

import asyncio
import logging

from broker import keys, messages
from broker.connection import async_client

log = logging.getLogger(__name__)


class TokenRelay:
    def __init__(self, redis_url: str, instance_id: str):
        self.channel = keys.reply_channel(instance_id)
        self._client = async_client(redis_url)
        self._queues: dict[str, asyncio.Queue] = {}
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self.reconnects = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="token-relay")
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
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

    def dispatch(self, data: bytes) -> None:
        """One published batch (a worker's step) to the queues of the requests it names."""
        for event in messages.decode_batch(data):
            q = self._queues.get(event.request_id)
            if q is not None:
                q.put_nowait(event)

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._ready.set()
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg["type"] != "message":
                        continue
                    self.dispatch(msg["data"])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - resubscribe; gaps are refilled from the output log
                self.reconnects += 1
                log.exception("token relay lost its subscription; resubscribing")
                for q in self._queues.values():
                    q.put_nowait(None)  # wake readers so they check the log for gaps
                await asyncio.sleep(0.2)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
