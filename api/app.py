"""The FastAPI application: ``create_app(settings)`` for tests, ``main()`` for uvicorn."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api import errors
from api.auth import KeyStore
from api.body import BodyLimit, install_schemas
from api.catalog import Catalog
from api.relay import TokenRelay
from api.jobs import JobService
from api.offload import Offload
from api.routes import admin, audio, chat, completions, images, jobs, observability, system, videos
from api.routes._text import key_gate
from api.schemas import ChatCompletionRequest, CompletionRequest
from api.settings import ApiSettings
from api.state import AppState
from api.streams import StreamStore
from broker.connection import async_client
from inferstack import __version__
from inferstack.registry import Modality, Registry
from metrics import prom, tracing
from metrics.events import EventSink
from scheduler.queue import AsyncFairQueue
from scheduler.settings import SchedulerSettings

log = logging.getLogger(__name__)


def create_app(settings: ApiSettings | None = None, sched: SchedulerSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    sched = sched or SchedulerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis = async_client(settings.redis_url)
        relay = TokenRelay(settings.redis_url, settings.instance_id)
        await relay.start()
        events = EventSink(redis, settings.events_maxlen)
        await events.start()
        if not tracing.enabled():
            tracing.setup("inferstack-api", settings.otlp_endpoint)
        registry = Registry.load(settings.models_file)
        offload = Offload(settings.tokenize_threads)
        catalog = Catalog(registry, settings.cache_dir, offload)
        app.state.inferstack = AppState(
            settings=settings, sched=sched, redis=redis, relay=relay, queue=AsyncFairQueue(redis, sched),
            catalog=catalog, keys=keys, offload=offload, events=events, jobs=JobService(settings, relay),
            streams=StreamStore(redis, settings.stream_grace_s, sched.output_log_ttl_s),
        )
        for spec in registry:  # warm the tokenizers of the text models this host has
            if spec.modality is Modality.TEXT:
                try:
                    await catalog.text(spec.name)
                except errors.OpenAIError:
                    log.info("%s: weights not on this host; requests for it will get 404", spec.name)
        log.info("API %s ready (reply channel %s)", settings.instance_id, relay.channel)
        yield
        app.state.inferstack.jobs.close()
        offload.close()
        await relay.stop()
        await events.stop()
        if app.state.inferstack.stats_store is not None:
            app.state.inferstack.stats_store.close()
        await redis.aclose()

    keys = KeyStore.load(settings.keys_file)
    # With keys, the schema needs one too (key_gate) and there is no docs UI (it could
    # not send the key).
    docs = {} if keys.open else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title="Inference Stack", version=__version__, lifespan=lifespan,
                  dependencies=[Depends(key_gate)], **docs)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    errors.install(app, settings.max_body_bytes)
    app.include_router(system.router)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(observability.router)
    app.include_router(admin.router)
    app.include_router(images.router)
    app.include_router(audio.router)
    app.include_router(videos.router)
    app.include_router(jobs.router)
    install_schemas(app, ChatCompletionRequest, CompletionRequest)
    if not keys.open:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi():
            return app.openapi()  # behind key_gate
    return app


def main(settings: ApiSettings | None = None) -> None:
    import uvicorn

    settings = settings or ApiSettings()
    logging.basicConfig(level=os.environ.get("INFERSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s api %(name)s: %(message)s")
    if settings.api_workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                    timeout_graceful_shutdown=5)
        return
    # Several processes on one port: each builds its app from the environment, and
    # their Prometheus counters meet in one directory (multiprocess mode).
    path, created = prom.prepare_multiprocess()
    log.info("%d API processes; Prometheus multiprocess directory %s", settings.api_workers, path)
    try:
        uvicorn.run("api.app:create_app", factory=True, workers=settings.api_workers, host=settings.host,
                    port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if created:
            prom.cleanup_multiprocess(path)

