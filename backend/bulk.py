"""Bulk predictions for curators: one rq job predicts a whole project and writes the
predictions into Label Studio through its API, with the model version that made them.

The serving process only enqueues (``BULK_JOB`` by dotted name, one job per project); the
job runs in a worker with the project's live models. Progress (``done`` / ``total`` tasks,
``failed``) is in the job's meta.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from backend.images import ImageLoader
from backend.labeling import parse_label_config
from backend.predict import Predictor
from backend.redis_server import connect, ensure_redis
from backend.registry import Registry
from backend.service import project_bundle
from backend.settings import Settings, get_settings
from backend.studio import StudioClient

log = logging.getLogger(__name__)

BULK_JOB = "backend.bulk.predict_project"
PROGRESS_EVERY = 2.0  # seconds between progress writes


def bulk_job_id(project: str) -> str:
    return f"ls-sahi-predict-{project}"


def enqueue_bulk(
    client: redis.Redis, settings: Settings, project: str, only_missing: bool = True
) -> Job:
    """The project's bulk job: the one already waiting or running, or a new one."""
    try:
        job = Job.fetch(bulk_job_id(project), connection=client)
        if job.get_status() in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED):
            return job
        job.delete()
    except NoSuchJobError:
        pass
    return Queue(settings.predict_queue, connection=client).enqueue(
        BULK_JOB,
        project,
        only_missing,
        job_id=bulk_job_id(project),
        job_timeout=settings.job_timeout,
        result_ttl=7 * 24 * 3600,
        description=f"predict project {project} ({'tasks without a current prediction' if only_missing else 'all tasks'})",
    )


def job_progress(client: redis.Redis, project: str) -> dict[str, Any]:
    """Status and progress of a project's bulk job (for ``GET /bulk-predict/<project>``)."""
    try:
        job = Job.fetch(bulk_job_id(project), connection=client)
    except NoSuchJobError:
        return {"job": None, "status": "none"}
    status = job.get_status()
    answer: dict[str, Any] = {
        "job": job.id,
        "status": str(status.value if status else "unknown"),
        **job.meta,
    }
    if status == JobStatus.FINISHED:
        answer["result"] = job.return_value()
    return answer


def predict_project(project: str, only_missing: bool = True) -> dict[str, Any]:
    """rq entry point: predict the project's tasks and post the predictions to Label Studio."""
    settings = get_settings()
    job = get_current_job()
    client = (
        job.connection
        if job is not None
        else connect(ensure_redis(settings.redis_url, settings.model_dir)[0])
    )
    bundle = project_bundle(settings, Registry(settings.model_dir / "projects", client), project)
    done = failed = skipped = 0
    last = 0.0
    with StudioClient(settings) as studio, ImageLoader(settings) as loader:
        config = parse_label_config(studio.project(project)["label_config"])
        tasks = list(studio.iter_tasks(project))
        predictor = Predictor(bundle, settings, loader.load)
        try:
            for i, task in enumerate(tasks, 1):
                versions = {
                    p.get("model_version")
                    for p in task.get("predictions") or []
                    if isinstance(p, dict)
                }
                if only_missing and bundle.version in versions:
                    skipped += 1
                else:
                    prediction = predictor.predict_task(task, config)
                    if prediction.error is None:
                        studio.create_prediction(
                            int(task["id"]), prediction.result, prediction.score, bundle.version
                        )
                        done += 1
                    else:
                        failed += 1
                if job is not None and (
                    time.monotonic() - last > PROGRESS_EVERY or i == len(tasks)
                ):
                    last = time.monotonic()
                    job.meta.update(
                        {
                            "done": i,
                            "total": len(tasks),
                            "predicted": done,
                            "failed": failed,
                            "skipped": skipped,
                        }
                    )
                    job.save_meta()
        finally:
            predictor.close()
    log.info(
        "bulk_predicted project=%s predicted=%s failed=%s skipped=%s",
        project,
        done,
        failed,
        skipped,
    )
    return {
        "project": project,
        "model_version": bundle.version,
        "predicted": done,
        "failed": failed,
        "skipped": skipped,
        "total": len(tasks),
    }
