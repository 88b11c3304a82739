"""One pub/sub listener per API process, fanning token events out to per-request
queues. The process subscribes to its reply channel once, at start-up, before any
request is enqueued, so no event can be published before someone listens.

When the subscription drops (Redis restarted, a network blip) the relay
resubscribes with backoff and wakes every reader with ``None`` both when the loss is
noticed and once it is subscribed again: readers then fill what they missed from the
requests' output logs (``api.generation``)."""

from __future__ import annotations

import asyncio
import logging

from broker import keys, messages
from broker.connection import UNAVAILABLE, Outage, async_client

log = logging.getLogger(__name__)


class TokenRelay:
    def __init__(self, redis_url: str, instance_id: str):
        self.channel = keys.reply_channel(instance_id)
        self._client = async_client(redis_url)
        self._queues: dict[str, list[asyncio.Queue]] = {}
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self.outage = Outage(f"token relay {self.channel}", log)
        """Whether the subscription is down now, and since when."""
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
        for queues in self._queues.values():
            for q in queues:
                q.put_nowait(None)

    def dispatch(self, data: bytes) -> None:
        """One published batch (a worker's step) to the queues of the requests it names."""
        for event in messages.decode_batch(data):
            for q in self._queues.get(event.request_id, ()):
                q.put_nowait(event)

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                # redis-py reconnects and resubscribes on its own after a short blip; what
                # was published meanwhile is lost to us, so readers must look at the logs.
                pubsub.connection.register_connect_callback(self._resubscribed)
                self._ready.set()
                if self.outage.ok() is not None:
                    self.reconnects += 1
                    self._wake_all()  # subscribed again: what was published meanwhile is in the logs
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None or msg["type"] != "message":
                        continue
                    self.dispatch(msg["data"])
            except asyncio.CancelledError:
                raise
            except UNAVAILABLE as exc:
                first = not self.outage.down
                pause = self.outage.failed(exc)
                if first:
                    self._wake_all()  # readers start counting the outage
                await asyncio.sleep(pause)
            except Exception:  # noqa: BLE001 - resubscribe; gaps are refilled from the output log
                log.exception("token relay failed; resubscribing")
                self.outage.failed(RuntimeError("relay error"))
                self._wake_all()
                await asyncio.sleep(0.2)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001
                    pass
