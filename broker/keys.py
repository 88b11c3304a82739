"""Every Redis key and channel name the stack uses, in one place.

Keys that one Lua script touches together carry the same hash tag (``{model}``)
so the scripts run unchanged on Redis Cluster. Everything is under the ``is:``
prefix so a shared Redis can be inspected (``SCAN MATCH is:*``) or flushed safely.
"""

PREFIX = "is"

# -- per model, all in the {model} hash slot ---------------------------------


def tag(model: str) -> str:
    return f"{PREFIX}:{{{model}}}"


def request(model: str, request_id: str) -> str:
    """Hash: the queued request (payload, user, tier, cost, tags, state, lease owner)."""
    return f"{tag(model)}:req:{request_id}"


def output_log(model: str, request_id: str) -> str:
    """List: every token event already published for a request, so that a worker
    taking over after a crash resumes exactly where the dead one stopped."""
    return f"{tag(model)}:out:{request_id}"


def user_queue(model: str, tier: str, user: str) -> str:
    """List: one user's waiting request ids in one tier, FIFO."""
    return f"{tag(model)}:uq:{tier}:{user}"


def tier_users(model: str, tier: str) -> str:
    """Sorted set: users with waiting work in a tier, scored by the start tag of their head request."""
    return f"{tag(model)}:tu:{tier}"


def tier_age(model: str, tier: str) -> str:
    """Sorted set: waiting request ids in a tier by enqueue time (for aging and deadlines)."""
    return f"{tag(model)}:age:{tier}"


def tier_state(model: str) -> str:
    """Hash: virtual time per tier (``v:<tier>``), queue lengths and costs, counters."""
    return f"{tag(model)}:state"


def finish_tags(model: str, tier: str) -> str:
    """Sorted set: user -> finish tag of the user's last request in a tier (fair
    queueing). A tag at or below the tier's virtual time means the same as none, so
    those are dropped as the virtual time passes them, and all of them when the tier
    has nothing left waiting: the set holds only users with recent work."""
    return f"{tag(model)}:fin:{tier}"


def user_counts(model: str) -> str:
    """Hash: user -> number of requests waiting (per-user cap); a user's field goes
    when the count reaches zero."""
    return f"{tag(model)}:ucount"


def leases(model: str) -> str:
    """Sorted set: in-flight request ids scored by lease expiry (unix seconds)."""
    return f"{tag(model)}:leases"


def alive(model: str) -> str:
    """Hash: worker id -> unix time it last claimed or renewed leases of this model. The
    reaper requeues the requests of a worker silent for ``worker_dead_s`` (a few missed
    heartbeats) without waiting for their leases to lapse."""
    return f"{tag(model)}:alive"


def doorbell(model: str) -> str:
    """List used only to wake idle workers (BLPOP) when work arrives."""
    return f"{tag(model)}:bell"


def drain(model: str) -> str:
    """Hash: observed drain rate of the model's queue (EWMA of cost units per second)."""
    return f"{tag(model)}:drain"


def reaper_lock(model: str) -> str:
    return f"{tag(model)}:reaper"


def worker_doorbell(model: str, worker_id: str) -> str:
    """List: wakes one worker when a request reserved for it (KV affinity) arrives;
    expires a minute after the last ring, so dead workers leave none behind."""
    return f"{tag(model)}:bell:{worker_id}"


def kv_session(model: str, session_key: str) -> str:
    """Hash: worker id -> "expiry:tokens" for each worker holding this session's KV cache
    in DRAM. Fields past their expiry are ignored; the key expires with its last holder."""
    return f"{tag(model)}:kvs:{session_key}"


def kv_prefix(model: str, block_hash: str) -> str:
    """Hash: worker id -> "expiry:tokens" for each worker holding this prefix block's KV."""
    return f"{tag(model)}:kvp:{block_hash}"


# -- cluster-wide -------------------------------------------------------------

WORKERS = f"{PREFIX}:workers"
"""Sorted set: worker id -> unix time of its last heartbeat."""


def worker(worker_id: str) -> str:
    """Hash with a TTL: the worker's last heartbeat (host, device, models, memory, load)."""
    return f"{PREFIX}:worker:{worker_id}"


def reply_channel(api_instance: str) -> str:
    """Pub/sub channel of one API process: workers publish token events for its requests here."""
    return f"{PREFIX}:reply:{api_instance}"


def stream(stream_id: str) -> str:
    """Hash: an SSE stream a client may resume (``GET /v1/chat/completions/<id>/stream``):
    its owner, how to render it, its request ids and reply channel, how many clients
    read it now. Kept while it generates and ``output_log_ttl_s`` after it ends, like the
    output logs it is replayed from."""
    return f"{PREFIX}:stream:{stream_id}"


CANCEL_CHANNEL = f"{PREFIX}:cancel"
"""Pub/sub channel: API processes announce cancelled request ids; workers drop them."""


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


# -- media jobs (rq) -------------------------------------------------------------

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
