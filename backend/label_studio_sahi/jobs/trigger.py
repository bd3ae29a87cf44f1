"""When to train: webhook events counted per project, and at most one queued job per project.

This is the serving side of training (the job itself is ``training/job.py``). The serving
process enqueues jobs by their dotted name (``names.TRAIN_JOB``), so it never imports the
training code. A project's job id is fixed (``names.train_job_id``): while that job waits
in the queue, new events join it; while it runs, the change count is kept, so the first
event after it ends queues the next run (which pulls every label from Label Studio, those
that arrived meanwhile included). No project ever has two jobs queued.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from rq import Queue
from rq.job import Job, JobStatus

from label_studio_sahi import names
from label_studio_sahi.errors import BadRequest
from label_studio_sahi.jobs.queueing import WAITING, enqueue_lock, enqueue_unique
from label_studio_sahi.labelstudio.client import project_id
from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)

CHANGES_TTL = 30 * 24 * 3600  # seconds a project's change count waits for its next event

COUNTED_ACTIONS = {
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATION_DELETED",
    "ANNOTATIONS_DELETED",
}


def _project_of(body: dict[str, Any]) -> str | None:
    """The event's project id (``BadRequest`` when it is not one), or None when absent.

    Label Studio sends the project as an object; anything else is not its webhook."""
    project = body.get("project")
    if project is None:
        return None
    if not isinstance(project, dict):
        raise BadRequest(
            f"the webhook's 'project' must be an object with an 'id', not {type(project).__name__}"
        )
    value = project.get("id")
    return project_id(value) if value not in (None, "") else None


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
        if action not in COUNTED_ACTIONS and action != "START_TRAINING":
            return 200, {"status": "Unknown event", "action": action}
        try:
            project = _project_of(body)
        except BadRequest as exc:
            return exc.status, exc.to_json()
        if project is None:
            return 400, BadRequest(f"{action} webhook without project id").to_json()
        if action == "START_TRAINING":
            job = self.enqueue(project, reason="train button", delay=0.0)
            return 201, {"status": "ok", "job": job.id, "job_status": job.get_status(refresh=False)}
        changes = names.CHANGES_KEY.format(project=project)
        pipe = self.redis.pipeline()
        pipe.incrby(changes, _changes(body))
        pipe.expire(changes, CHANGES_TTL)  # a project that stopped labelling leaves no key
        count = int(pipe.execute()[0])
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
        """The project's job: the one already waiting or running, or a new one (after
        ``delay`` seconds)."""
        # The lock makes check-then-enqueue, and clearing the count, one step.
        with enqueue_lock(self.redis, names.train_job_id(project)):
            # A retry of this job reuses run_id, which is how a run knows it already published.
            job, created = enqueue_unique(
                self.queue,
                names.TRAIN_JOB,
                (project, reason, uuid.uuid4().hex),
                job_id=names.train_job_id(project),
                reuse=WAITING | {JobStatus.STARTED},
                settings=self.settings,
                description=f"fine-tune project {project} ({reason})",
                delay=delay,
                retry=True,
            )
            status = job.get_status(refresh=False)
            if status != JobStatus.STARTED:
                # Queued now, or already waiting: these changes are in it. While a run is
                # under way they are kept for the next run.
                self.redis.delete(names.CHANGES_KEY.format(project=project))
            log.info(
                "train_job project=%s job=%s status=%s new=%s reason=%s delay=%s",
                project, job.id, status, created, reason, delay,
            )  # fmt: skip
            return job
