"""Bulk predictions for curators: one rq job predicts a whole project and writes the
predictions into Label Studio through its API, with the model version that made them.

The serving process only enqueues (``names.BULK_JOB`` by dotted name, one job per
project); the job runs in a worker with the project's live models. Progress (``done`` /
``total`` tasks, ``failed``) is in the job's meta.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import Queue, get_current_job
from rq.job import Job, JobStatus

from label_studio_sahi import names
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.jobs.queueing import (
    WAITING,
    JobMetaWriter,
    enqueue_lock,
    enqueue_unique,
    job_redis,
    job_state,
)
from label_studio_sahi.labelstudio.client import StudioClient
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.pipeline import Predictor
from label_studio_sahi.settings import Settings, get_settings
from label_studio_sahi.versions.bundles import project_bundle
from label_studio_sahi.versions.registry import Registry

log = logging.getLogger(__name__)


def enqueue_bulk(
    client: redis.Redis, settings: Settings, project: str, only_missing: bool = True
) -> Job:
    """The project's bulk job: the one already waiting or running, or a new one."""
    which = "tasks without a current prediction" if only_missing else "all tasks"
    with enqueue_lock(client, names.bulk_job_id(project)):
        job, _ = enqueue_unique(
            Queue(settings.predict_queue, connection=client),
            names.BULK_JOB,
            (project, only_missing),
            job_id=names.bulk_job_id(project),
            reuse=WAITING | {JobStatus.STARTED},
            settings=settings,
            description=f"predict project {project} ({which})",
        )
    return job


def job_progress(client: redis.Redis, project: str) -> dict[str, Any]:
    """Status and progress of a project's bulk job (for ``GET /bulk-predict/<project>``)."""
    return job_state(client, names.bulk_job_id(project))


def predict_project(project: str, only_missing: bool = True) -> dict[str, Any]:
    """rq entry point: predict the project's tasks and post the predictions to Label Studio."""
    settings = get_settings()
    bundle = project_bundle(settings, Registry.for_settings(settings, job_redis(settings)), project)
    progress = JobMetaWriter(get_current_job())
    done = failed = skipped = 0
    with StudioClient.from_settings(settings) as studio, ImageLoader(settings) as loader:
        config = parse_label_config(studio.project(project)["label_config"])
        tasks = list(studio.iter_tasks(project))
        predictor = Predictor(bundle, settings, loader.load_pixels)
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
                progress(
                    force=i == len(tasks),
                    done=i,
                    total=len(tasks),
                    predicted=done,
                    failed=failed,
                    skipped=skipped,
                )
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
