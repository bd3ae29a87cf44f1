"""When to train: webhook events counted per project, and at most one queued job per project.

The serving process enqueues jobs by their dotted name (``TRAIN_JOB``), so it never imports
the training code. A project's job id is fixed (``ls-sahi-train-<project>``): while that job
waits in the queue, new events join it; while it runs, the change count is kept, so the
first event after it ends queues the next run (which pulls every label from Label Studio,
those that arrived meanwhile included). No project ever has two jobs queued.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.settings import Settings

log = logging.getLogger(__name__)

TRAIN_JOB = "backend.training.job.train_project"
COUNT_KEY = "ls-sahi:changes:{project}"
LOCK_KEY = "ls-sahi:enqueue-lock:{project}"
COUNTED_ACTIONS = {
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATION_DELETED",
    "ANNOTATIONS_DELETED",
}
WAITING = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED}


def train_job_id(project: str) -> str:
    return f"ls-sahi-train-{project}"


def _project_of(body: dict[str, Any]) -> str | None:
    project = body.get("project")
    value = project.get("id") if isinstance(project, dict) else project
    return str(value) if value not in (None, "") else None


def _changes(body: dict[str, Any]) -> int:
    """How many annotations an event touches (bulk deletes carry a list)."""
    annotations = body.get("annotations")
    return len(annotations) if isinstance(annotations, list) and annotations else 1


class TrainingTrigger:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.queue = Queue(settings.train_queue, connection=client)

    def on_webhook(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Answer a Label Studio webhook at once; training never runs in the request."""
        action = str(body.get("action") or "")
        project = _project_of(body)
        if action not in COUNTED_ACTIONS and action != "START_TRAINING":
            return 200, {"status": "Unknown event", "action": action}
        if project is None:
            return 400, {
                "error": "bad_request",
                "detail": f"{action} webhook without project id",
                "status_code": 400,
            }
        if action == "START_TRAINING":
            job = self.enqueue(project, reason="train button", delay=0.0)
            return 201, {"status": "ok", "job": job.id, "job_status": job.get_status(refresh=False)}
        count = int(self.redis.incrby(COUNT_KEY.format(project=project), _changes(body)))
        if count < self.settings.train_after_annotations:
            return 201, {
                "status": "ok",
                "changes": count,
                "train_after": self.settings.train_after_annotations,
            }
        job = self.enqueue(
            project,
            reason=f"{count} annotation changes",
            delay=self.settings.train_debounce_seconds,
        )
        return 201, {"status": "ok", "job": job.id, "job_status": job.get_status(refresh=False)}

    def enqueue(self, project: str, reason: str, delay: float) -> Job:
        """The project's job: the one already waiting, or a new one (after ``delay`` seconds)."""
        job_id = train_job_id(project)
        # A short lock makes check-then-enqueue atomic across threads and serving processes.
        with self.redis.lock(LOCK_KEY.format(project=project), timeout=30, blocking_timeout=10):
            try:
                job = Job.fetch(job_id, connection=self.redis)
                status = job.get_status()
            except NoSuchJobError:
                job, status = None, None
            if job is not None and status in WAITING:
                self.redis.delete(COUNT_KEY.format(project=project))
                log.info("train_job_waiting project=%s job=%s status=%s", project, job_id, status)
                return job
            if job is not None and status == JobStatus.STARTED:
                log.info("train_job_running project=%s job=%s: next run after it", project, job_id)
                return job
            self.redis.delete(COUNT_KEY.format(project=project))
            if job is not None:
                job.delete()  # finished or failed: its id is free for the next run
            # A retry of this job reuses run_id, which is how a run knows it already published.
            run_id = uuid.uuid4().hex
            options: dict[str, Any] = {
                "job_id": job_id,
                "job_timeout": self.settings.job_timeout,
                "retry": Retry(max=self.settings.job_retries, interval=5)
                if self.settings.job_retries
                else None,
                "result_ttl": 7 * 24 * 3600,
                "failure_ttl": 7 * 24 * 3600,
                "description": f"fine-tune project {project} ({reason})",
            }
            if delay > 0:
                job = self.queue.enqueue_in(
                    timedelta(seconds=delay), TRAIN_JOB, project, reason, run_id, **options
                )
            else:
                job = self.queue.enqueue(TRAIN_JOB, project, reason, run_id, **options)
            log.info(
                "train_job_enqueued project=%s job=%s reason=%s delay=%s",
                project,
                job_id,
                reason,
                delay,
            )
            return job
