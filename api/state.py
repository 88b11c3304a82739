"""Everything one API process holds, created in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from api.auth import KeyStore
from api.catalog import Catalog
from api.jobs import JobService
from api.offload import Offload
from api.relay import TokenRelay
from api.settings import ApiSettings
from api.streams import StreamStore
from metrics.events import EventSink
from scheduler.queue import AsyncFairQueue
from scheduler.settings import SchedulerSettings


@dataclass
class AppState:
    settings: ApiSettings
    sched: SchedulerSettings
    redis: object
    relay: TokenRelay
    queue: AsyncFairQueue
    catalog: Catalog
    keys: KeyStore
    offload: Offload
    """The bounded pool for parsing, templating and tokenizing (never on the event loop)."""
    streams: StreamStore
    """Records of resumable SSE streams."""
    events: EventSink | None = None
    """Lifecycle events for the metrics exporter."""
    stats_store: object = None
    """The metrics store (``metrics.store``), opened by the first /v1/stats."""
    jobs: JobService | None = None
    """Media jobs (rq)."""
