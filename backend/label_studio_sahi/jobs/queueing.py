"""rq plumbing shared by the training trigger and bulk predictions.

* ``enqueue_unique``: one job per fixed id; a waiting (or running) one is reused, a
  finished or failed one makes room for the next.
* ``job_redis``: the Redis a job runs against (its worker's, or ``REDIS_URL`` / the
  embedded server when called outside rq).
* ``JobMetaWriter``: a job's progress in its ``meta``, written at most every few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

import redis
from rq import Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from label_studio_sahi import names
from label_studio_sahi.errors import Busy
from label_studio_sahi.jobs.redis_server import connect, ensure_redis
from label_studio_sahi.settings import Settings

ENQUEUE_LOCK_WAIT = 2.0  # seconds a request waits for the enqueue lock before a 503
WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED})
PROGRESS_EVERY = 2.0  # seconds between progress writes to Redis
RESULT_TTL = 7 * 24 * 3600  # finished and failed jobs stay visible (rq info, /bulk-predict) a week


def fetch_job(client: redis.Redis, job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=client)
    except NoSuchJobError:
        return None


def job_state(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """A job's status, its progress meta and, once finished, its result (what the CLI
    prints while waiting and ``GET /bulk-predict/<project>`` answers)."""
    job = fetch_job(client, job_id)
    if job is None:
        return {"job": None, "status": "none"}
    status = job.get_status()
    state: dict[str, Any] = {
        "job": job.id,
        "status": str(status.value if status else "unknown"),
        **job.meta,
    }
    if status == JobStatus.FINISHED:
        state["result"] = job.return_value()
    elif status == JobStatus.FAILED and job.exc_info:
        # The exception's last line (its type and message), not the whole traceback.
        state["error"] = job.exc_info.strip().splitlines()[-1][:500]
    return state


@contextmanager
def enqueue_lock(client: redis.Redis, job_id: str) -> Iterator[None]:
    """Serialises check-then-enqueue of ``job_id`` across threads and serving processes;
    :class:`Busy` (503) when another holder keeps it past ``ENQUEUE_LOCK_WAIT``."""
    lock = client.lock(
        names.ENQUEUE_LOCK_KEY.format(job_id=job_id), timeout=30, blocking_timeout=ENQUEUE_LOCK_WAIT
    )
    try:
        acquired = lock.acquire()
    except redis.RedisError as exc:
        raise Busy(f"Redis did not answer ({type(exc).__name__}); try again") from None
    if not acquired:
        raise Busy(f"another request is queueing job {job_id}; try again in a moment")
    try:
        yield
    finally:
        with suppress(redis.exceptions.LockError):  # expired meanwhile: nothing to release
            lock.release()


def enqueue_unique(
    queue: Queue,
    func: str,
    args: tuple[Any, ...],
    *,
    job_id: str,
    reuse: Collection[JobStatus],
    settings: Settings,
    description: str,
    delay: float = 0.0,
    retry: bool = False,
) -> tuple[Job, bool]:
    """``(job, created)``: the job ``job_id`` when its status is in ``reuse``, else a new
    one (after ``delay`` seconds) that replaces the finished or failed one. A reused job
    that waits for a later time is queued now when this call asks for no delay (the Train
    button during a debounce).

    Callers hold :func:`enqueue_lock` for ``job_id``: two processes may race.
    """
    job = fetch_job(queue.connection, job_id)
    if job is not None:
        status = job.get_status()
        if status in reuse:
            if status == JobStatus.SCHEDULED and delay <= 0:
                queue.scheduled_job_registry.requeue(job)
                job.refresh()
            return job, False
        job.delete()  # finished or failed: its id is free for the next run
    options: dict[str, Any] = {
        "job_id": job_id,
        "job_timeout": settings.job_timeout,
        "result_ttl": RESULT_TTL,
        "failure_ttl": RESULT_TTL,
        "description": description,
        "retry": Retry(max=settings.job_retries, interval=5)
        if retry and settings.job_retries
        else None,
    }
    if delay > 0:
        return queue.enqueue_in(timedelta(seconds=delay), func, *args, **options), True
    return queue.enqueue(func, *args, **options), True


def job_redis(settings: Settings) -> redis.Redis:
    """The connection of the rq job running now, else ``REDIS_URL`` or the embedded Redis."""
    job = get_current_job()
    if job is not None:
        return job.connection
    return connect(ensure_redis(settings.redis_url, settings.model_dir)[0])


class JobMetaWriter:
    """Writes a job's progress into its ``meta`` (``rq info``, ``Job.fetch(id).meta``),
    at most every ``PROGRESS_EVERY`` seconds unless forced; a no-op outside rq."""

    def __init__(self, job: Job | None = None, every: float = PROGRESS_EVERY) -> None:
        self.job = job
        self.every = every
        self._last = 0.0

    def __call__(self, force: bool = False, **values: Any) -> None:
        if self.job is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self.job.meta.update(values)
        self.job.save_meta()
