"""Redis key names outside any one model's queue: the workers' heartbeats, resumable
streams, the lifecycle event stream, host supervisors, on-demand model loading, media
jobs (rq).

The queue's own keys and channels (per model, under its ``{model}`` hash tag) are
``scheduler.keys``: the scheduler owns that layout. Everything is under the ``is:``
prefix so a shared Redis can be inspected (``SCAN MATCH is:*``) or flushed safely."""

PREFIX = "is"

# -- deployment-wide (each key alone in its slot: never touched together by a script) --

WORKERS = f"{PREFIX}:workers"
"""Sorted set: worker id -> unix time of its last heartbeat."""


def worker(worker_id: str) -> str:
    """Hash with a TTL: the worker's last heartbeat (host, device, models, memory, load)."""
    return f"{PREFIX}:worker:{worker_id}"


def stream(stream_id: str) -> str:
    """Hash: an SSE stream a client may resume (``GET /v1/chat/completions/<id>/stream``):
    its owner, how to render it, its model, request ids and reply channel, how many
    clients read it now (``api.streams``). Found by the stream id alone (the resume URL
    names nothing else), so it lives outside the model's queue. Kept while it generates
    and ``output_log_ttl_s`` after it ends, like the output logs it is replayed from."""
    return f"{PREFIX}:stream:{stream_id}"


EVENTS = f"{PREFIX}:events"
"""Stream: one entry per request lifecycle step (``metrics.events``), appended by API
processes and workers with ``XADD MAXLEN ~``, consumed by the metrics exporter."""

EVENTS_GROUP = "exporter"
"""Consumer group of :data:`EVENTS` that the metrics exporters share."""


HOSTS = f"{PREFIX}:hosts"
"""Sorted set: host id -> unix time of its supervisor's last status (``inferstack host``)."""


def host(host_id: str) -> str:
    """Hash with a TTL: a host supervisor's status (devices, mode, its workers, the
    mode change it is applying and how that went)."""
    return f"{PREFIX}:host:{host_id}"


def host_commands(host_id: str) -> str:
    """List: mode changes for one host's supervisor (the admin API pushes, it pops)."""
    return f"{PREFIX}:host:{host_id}:commands"


def load_claim(model: str) -> str:
    """String with a TTL: the worker that took on loading a model nobody serves (SET NX),
    so two workers seeing the same demand do not both load it."""
    return f"{PREFIX}:load:{model}"


# -- media jobs (rq, on INFERSTACK_RQ_REDIS_URL: a plain or Sentinel-managed Redis) --

RQ_QUEUE_PREFIX = "rq:queue:"
"""rq stores a queue named N under ``rq:queue:N`` (``rq.Queue.redis_queue_namespace_prefix``)."""


def media_queue(model: str, tier: str) -> str:
    """Name of the rq queue of one media model at one tier (workers drain high first)."""
    return f"{PREFIX}:media:{model}:{tier}"


def media_result(job_id: str) -> str:
    """Hash with a TTL: a finished job's output files (field = index, value = bytes)."""
    return f"{PREFIX}:media:result:{job_id}"


def user_jobs(user: str) -> str:
    """Sorted set: a user's media jobs in flight (queued or running), scored by submit
    time; the per-user cap counts it."""
    return f"{PREFIX}:media:user:{user}"
