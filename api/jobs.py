"""Media jobs as the API sees them: submit to the model's rq queue for the caller's
tier (with a per-user cap on jobs in flight), read status and progress, cancel, wait
for the end, and serve the files. rq is synchronous, so its calls run in a thread."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import datetime

from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from api.auth import Identity
from api.errors import OpenAIError
from api.relay import TokenRelay
from api.settings import ApiSettings
from broker import keys, messages
from broker.connection import sync_client
from broker.messages import JobEvent, MediaRequest, Tier
from gpu_worker.media.jobs import JOB_FUNCTION

STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",  # waiting for a retry
    JobStatus.STARTED: "running",
    JobStatus.FINISHED: "succeeded",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "failed",
    JobStatus.CANCELED: "cancelled",
}
"""rq statuses -> the statuses this API reports."""

FINAL = {"succeeded", "failed", "cancelled"}

# Count a user's jobs in flight and admit one more only below the cap, atomically.
_ADMIT = """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""


def _unix(ts: datetime | None) -> int | None:
    return int(ts.timestamp()) if ts else None


def job_not_found(job_id: str) -> OpenAIError:
    return OpenAIError(404, f"No job with id '{job_id}'.", type="not_found_error", param="id", code="job_not_found")


class JobService:
    def __init__(self, settings: ApiSettings, relay: TokenRelay):
        self.s = settings
        self.relay = relay
        target = settings.rq_redis  # None: the shared Redis is a Cluster, and rq has none of its own
        self.conn = sync_client(target, decode_responses=False) if target else None  # rq keeps bytes
        self._admit = self.conn.register_script(_ADMIT) if self.conn else None
        self._waiters: dict[str, asyncio.Queue] = {}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def _require_rq(self) -> None:
        if self.conn is None:
            raise OpenAIError(503, "Media jobs are not available: this deployment runs on a Redis Cluster, which rq "
                              "cannot use, and has no INFERSTACK_RQ_REDIS_URL.", type="server_error",
                              code="jobs_unavailable")

    # -- submit -------------------------------------------------------------------

    async def submit(self, req: MediaRequest, identity: Identity, kind: str, *, wait: bool = False) -> Job:
        """Queue ``req``; with ``wait``, register for its end event first (no event can be missed)."""
        self._require_rq()
        if wait:
            req.reply_to = self.relay.channel_for(req.model)
            self._waiters[req.id] = self.relay.register(req.id)
        try:
            return await asyncio.to_thread(self._submit, req, identity, kind)
        except BaseException:
            if wait:
                self._waiters.pop(req.id, None)
                self.relay.unregister(req.id)
            raise

    def _submit(self, req: MediaRequest, identity: Identity, kind: str) -> Job:
        queued = sum(Queue(keys.media_queue(req.model, t), connection=self.conn).count for t in Tier)
        if queued >= self.s.max_jobs_queued:
            raise OpenAIError(429, f"The job queue for `{req.model}` is full ({queued} waiting); retry later.",
                              type="rate_limit_error", code="queue_full", headers={"Retry-After": "30"})
        self._prune(identity.user)
        user_key = keys.user_jobs(identity.user)
        if not self._admit(keys=[user_key], args=[self.s.max_jobs_per_user, time.time(), req.id]):
            raise OpenAIError(429, f"You have {self.s.max_jobs_per_user} media jobs queued or running, the most "
                              "allowed; wait for one to finish or cancel one.", type="rate_limit_error",
                              code="too_many_jobs", headers={"Retry-After": "5"})
        queue = Queue(keys.media_queue(req.model, req.tier), connection=self.conn, serializer=JSONSerializer)
        try:
            return queue.enqueue(
                JOB_FUNCTION, messages.to_dict(req), job_id=req.id, job_timeout=self.s.job_timeout_s,
                result_ttl=self.s.job_result_ttl_s, failure_ttl=self.s.job_result_ttl_s, ttl=self.s.job_queue_ttl_s,
                retry=Retry(max=self.s.job_retries) if self.s.job_retries > 0 else None,
                meta={"user": identity.user, "kind": kind, "token": secrets.token_urlsafe(16)},
                description=f"{kind} {req.model}",
            )
        except BaseException:
            self.conn.zrem(user_key, req.id)
            raise

    def _prune(self, user: str) -> None:
        """Forget jobs in the user's in-flight set that ended without the worker saying
        so (a worker died, rq expired the job)."""
        user_key = keys.user_jobs(user)
        ids = [i.decode() for i in self.conn.zrange(user_key, 0, -1)]
        if not ids:
            return
        pipe = self.conn.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "status")
        stale = [i for i, status in zip(ids, pipe.execute())
                 if status is None or STATUS.get(JobStatus(status.decode()), "failed") in FINAL]
        if stale:
            self.conn.zrem(user_key, *stale)

    # -- read ---------------------------------------------------------------------

    async def get(self, job_id: str, identity: Identity | None, token: str | None = None) -> Job:
        """The job, if ``identity`` owns it or ``token`` is its file token; else 404 (as if
        it did not exist: other users' job ids are not confirmed)."""
        self._require_rq()
        try:
            job = await asyncio.to_thread(Job.fetch, job_id, self.conn, JSONSerializer)
        except (NoSuchJobError, ValueError):  # ValueError: not even a job id's shape
            raise job_not_found(job_id) from None
        owner = identity is not None and job.meta.get("user") == identity.user
        if not owner and not (token and secrets.compare_digest(token, job.meta.get("token", ""))):
            raise job_not_found(job_id)
        return job

    def status(self, job: Job) -> str:
        return STATUS.get(job.get_status(refresh=False), "queued")

    async def view(self, job: Job, base_url: str) -> dict:
        return await asyncio.to_thread(self._view, job, base_url)

    def _view(self, job: Job, base_url: str) -> dict:
        job.refresh()
        req = job.args[0]
        status = self.status(job)
        out = {
            "id": job.id, "object": "job", "kind": job.meta.get("kind"), "model": req["model"], "status": status,
            "progress": job.meta.get("progress"),
            "created_at": _unix(job.created_at),
            "started_at": _unix(job.started_at) if status != "queued" else None,
            "finished_at": _unix(job.ended_at) if status in ("succeeded", "failed") else None,
            "expires_at": None, "error": None, "result": None,
        }
        if status == "succeeded":
            ttl = self.conn.ttl(keys.media_result(job.id))
            out["expires_at"] = int(time.time()) + ttl if ttl and ttl > 0 else None
            files = (job.return_value() or {}).get("files", [])
            out["result"] = {"files": [
                {"index": f["index"], "media_type": f["media_type"], "bytes": f["bytes"],
                 "url": self.file_url(job, f["index"], base_url)} for f in files]}
        elif status == "failed":
            latest = job.latest_result()
            text = (latest.exc_string or "").strip().splitlines() if latest else []
            out["error"] = {"message": text[-1] if text else "the job failed", "code": "job_failed"}
        return out

    def file_url(self, job: Job, index: int, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/v1/jobs/{job.id}/content/{index}?token={job.meta.get('token', '')}"

    async def files(self, job: Job) -> list[tuple[bytes, str]]:
        """A succeeded job's files, in order, with their media types."""
        def read():
            stored = self.conn.hgetall(keys.media_result(job.id))
            kinds = {f["index"]: f["media_type"] for f in (job.return_value() or {}).get("files", [])}
            return [(stored[str(i).encode()], kinds[i]) for i in sorted(kinds) if str(i).encode() in stored]

        return await asyncio.to_thread(read)

    # -- cancel and wait --------------------------------------------------------------

    async def cancel(self, job: Job) -> None:
        def cancel():
            status = job.get_status(refresh=True)
            if STATUS.get(status) in FINAL:
                return
            try:
                job.cancel()
            except InvalidJobOperation:
                pass  # cancelled meanwhile
            self.conn.zrem(keys.user_jobs(job.meta.get("user", "")), job.id)

        await asyncio.to_thread(cancel)

    async def wait(self, job: Job, timeout_s: float) -> str:
        """Wait (registered with ``submit(wait=True)``) until the job ends or the timeout;
        returns its status."""
        q = self._waiters.pop(job.id)

        def current() -> str:
            job.get_status(refresh=True)
            return self.status(job)

        deadline = time.monotonic() + timeout_s
        try:
            while True:
                status = await asyncio.to_thread(current)
                if status in FINAL:
                    return status
                left = deadline - time.monotonic()
                if left <= 0:
                    return status
                try:
                    item = await asyncio.wait_for(q.get(), min(left, 5.0))
                except TimeoutError:
                    continue  # re-read the status: an event can be lost if the relay reconnected
                if isinstance(item, JobEvent) and item.status in FINAL:
                    return item.status
        finally:
            self.relay.unregister(job.id)
