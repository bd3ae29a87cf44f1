"""Bulk predictions for curators: a project's tasks in chunk jobs that every free worker
takes, each writing its predictions into Label Studio with the one model version that the
request pinned.

A request (``enqueue_bulk``: ``POST /bulk-predict``, ``ls-sahi predict-project``, the
curators' page) pins the version live now and queues the run's planner
(``names.BULK_JOB``, one per project). The planner lists the tasks and queues them in
chunks of ``BULK_CHUNK_TASKS`` (``names.BULK_CHUNK_JOB``) on the predict queue; a chunk
loads the pinned version, predicts its tasks, posts them, and when it fails rq retries it
alone. ``job_progress`` adds the chunks' progress up.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from rq import Queue, Retry, get_current_job
from rq.job import Job, JobStatus

from label_studio_sahi import names
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.jobs.queueing import (
    RESULT_TTL,
    WAITING,
    JobMetaWriter,
    enqueue_lock,
    enqueue_unique,
    fetch_job,
    job_redis,
    job_state,
)
from label_studio_sahi.labelstudio.client import StudioClient
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.pipeline import Predictor
from label_studio_sahi.settings import Settings, get_settings
from label_studio_sahi.versions.bundles import ModelBundle, version_bundle
from label_studio_sahi.versions.registry import Registry

log = logging.getLogger(__name__)

BASE = "base"  # a run pinned to the base models (the word `ls-sahi rollback` and the page use)
CHUNK_RETRY_SECONDS = 5  # before a failed chunk's retry: a Label Studio that blinked is back
# A chunk in these states will not run again (rq's words; "missing": its job is gone).
CHUNK_ENDED = frozenset({"finished", "failed", "stopped", "canceled", "missing"})
CHUNK_WAITING = frozenset(str(status.value) for status in WAITING)

T = TypeVar("T")


def split_tasks(tasks: Sequence[T], size: int) -> list[list[T]]:
    """``tasks`` in order, in chunks of ``size`` (the last one may be shorter); none for none.

    Raises ValueError for a size below 1."""
    if size < 1:
        raise ValueError(f"a chunk holds at least 1 task, not {size}")
    return [list(tasks[start : start + size]) for start in range(0, len(tasks), size)]


def prediction_versions(task: dict[str, Any]) -> set[str]:
    """The model versions of a task's stored predictions."""
    return {
        str(p.get("model_version"))
        for p in task.get("predictions") or []
        if isinstance(p, dict) and p.get("model_version")
    }


def _slim(task: dict[str, Any]) -> dict[str, Any]:
    """What a chunk needs of a task: its id, data and which versions predicted it (not the
    annotations and stored results, which would only fill Redis)."""
    return {
        "id": task["id"],
        "data": task.get("data"),
        "predictions": [{"model_version": v} for v in sorted(prediction_versions(task))],
    }


# --- the request ---------------------------------------------------------------------------


def enqueue_bulk(
    client: redis.Redis, settings: Settings, project: str, only_missing: bool = True
) -> Job:
    """The project's bulk run (its planner job): the one waiting or running, or a new one
    pinned to the version live now. Raises :class:`Busy` while another request queues."""
    job_id = names.bulk_job_id(project)
    with enqueue_lock(client, job_id):
        current = fetch_job(client, job_id)
        if current is not None and run_going(client, current):
            return current
        if current is not None:
            _delete_chunks(client, current)  # a new run: the ended one makes room
        pinned = Registry.for_settings(settings, client).live(project) or BASE
        which = "tasks without a current prediction" if only_missing else "all tasks"
        job, _ = enqueue_unique(
            Queue(settings.predict_queue, connection=client),
            names.BULK_JOB,
            (project, only_missing, pinned),
            job_id=job_id,
            reuse=WAITING | {JobStatus.STARTED},
            settings=settings,
            description=f"predict project {project} ({which}) with {pinned}",
        )
    return job


def run_going(client: redis.Redis, planner: Job) -> bool:
    """Whether a run is still at work: its planner waits or runs, or a chunk will still run."""
    status = planner.get_status()
    if status in WAITING or status == JobStatus.STARTED:
        return True
    if status != JobStatus.FINISHED:
        return False
    return any(c.status not in CHUNK_ENDED for c in chunk_states(client, _chunk_ids(planner)))


def _chunk_ids(planner: Job) -> list[str]:
    return [str(i) for i in planner.meta.get("chunks") or []]


def _delete_chunks(client: redis.Redis, planner: Job) -> None:
    with client.pipeline() as pipe:
        for chunk in Job.fetch_many(_chunk_ids(planner), connection=client):
            if chunk is not None:
                chunk.delete(pipeline=pipe)
        pipe.execute()


# --- progress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkState:
    """One chunk as ``job_progress`` sees it: rq's status, the chunk's meta, its error."""

    status: str
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def chunk_states(client: redis.Redis, ids: Sequence[str]) -> list[ChunkState]:
    """The chunks' states, read in one round trip (plus one per failed chunk, for its error)."""
    states = []
    for chunk in Job.fetch_many(ids, connection=client):
        if chunk is None:
            states.append(ChunkState("missing", error="its job is gone from Redis"))
            continue
        status = chunk.get_status(refresh=False)
        value = str(status.value if status else "unknown")
        error = None
        if value == "failed":
            result = chunk.latest_result()
            if result is not None and result.exc_string:
                error = result.exc_string.strip().splitlines()[-1][:500]
        states.append(ChunkState(value, dict(chunk.meta), error))
    return states


def add_up(project: str, planned: dict[str, Any], chunks: Sequence[ChunkState]) -> dict[str, Any]:
    """A run's state from its planner's meta and its chunks' (``GET /bulk-predict``):
    ``status`` (started until every chunk ended, then finished, or failed when a chunk
    failed for good), tasks ``done`` of ``total``, ``predicted``, ``failed``, ``skipped``,
    the chunks per state, tasks predicted per worker, and once finished ``result``."""
    sums = {
        key: sum(int(c.meta.get(key) or 0) for c in chunks)
        for key in ("done", "predicted", "failed", "skipped")
    }
    unqueued = int(planned.get("unqueued") or 0)  # already predicted by the pinned version
    states = Counter(
        "waiting"
        if c.status in CHUNK_WAITING
        else "running"
        if c.status not in CHUNK_ENDED
        else "finished"
        if c.status == "finished"
        else "failed"
        for c in chunks
    )
    workers = Counter(w for c in chunks for w in (c.meta.get("written") or {}).values())
    model_version = planned.get("model_version") or next(
        (c.meta["model_version"] for c in chunks if c.meta.get("model_version")), None
    )
    ended = states["finished"] + states["failed"]
    status = "started" if ended < len(chunks) else "failed" if states["failed"] else "finished"
    total = int(planned.get("total") or 0)
    state: dict[str, Any] = {
        "status": status,
        "stage": f"chunks {ended}/{len(chunks)}",
        "run": planned.get("run"),
        "version": planned.get("version"),
        "model_version": model_version,
        "done": sums["done"] + unqueued,
        "total": total,
        "predicted": sums["predicted"],
        "failed": sums["failed"],
        "skipped": sums["skipped"] + unqueued,
        "chunks": {
            "total": len(chunks),
            **{k: states[k] for k in ("waiting", "running", "finished", "failed")},
        },
        "workers": dict(sorted(workers.items())),
    }
    if status == "finished":
        state["result"] = {
            "project": project,
            "model_version": model_version,
            "predicted": state["predicted"],
            "failed": state["failed"],
            "skipped": state["skipped"],
            "total": total,
        }
    elif status == "failed":
        first = next(c for c in chunks if c.status in CHUNK_ENDED and c.status != "finished")
        state["error"] = (
            f"{states['failed']} of {len(chunks)} chunks failed after their retries "
            f"(their tasks are not all predicted): {first.error or first.status}"
        )
    return state


def job_progress(client: redis.Redis, project: str) -> dict[str, Any]:
    """Status and progress of a project's bulk run (``GET /bulk-predict/<project>``, the
    CLI's ``--wait``, the page): the planner's own state while it waits, lists tasks or
    when it failed; then its chunks' added up (:func:`add_up`)."""
    job_id = names.bulk_job_id(project)
    planner = fetch_job(client, job_id)
    if planner is None or planner.get_status() != JobStatus.FINISHED:
        return job_state(client, job_id)
    if "chunks" not in planner.meta:  # a run of the single-job layout, finished before
        return job_state(client, job_id)
    chunks = chunk_states(client, _chunk_ids(planner))
    return {"job": planner.id, **add_up(project, planner.meta, chunks)}


# --- the jobs --------------------------------------------------------------------------------


def predict_project(
    project: str, only_missing: bool = True, version: str | None = None
) -> dict[str, Any]:
    """rq entry point, the run's planner: list the project's tasks and queue them in chunks
    pinned to ``version`` (a version's name or ``BASE``; None, from a job queued before
    runs were pinned: the version live now). Returns what it queued."""
    settings = get_settings()
    client = job_redis(settings)
    pinned = version or Registry.for_settings(settings, client).live(project) or BASE
    job = get_current_job()
    JobMetaWriter(job)(force=True, stage="listing tasks", version=pinned)
    with StudioClient.from_settings(settings) as studio:
        # An unusable labeling config fails the run here, once, not in every chunk.
        parse_label_config(studio.project(project)["label_config"])
        tasks = [_slim(task) for task in studio.iter_tasks(project)]
    # A version's name says what Label Studio stores; the base models' says it only once
    # loaded, so for them the chunks alone skip.
    known = None if pinned == BASE else names.model_version(project, pinned)
    todo = [t for t in tasks if not (only_missing and known in prediction_versions(t))]
    chunks = split_tasks(todo, settings.bulk_chunk_tasks)
    run = uuid.uuid4().hex[:12]
    ids = [names.bulk_chunk_job_id(project, run, i) for i in range(len(chunks))]
    retry = (
        Retry(max=settings.job_retries, interval=CHUNK_RETRY_SECONDS)
        if settings.job_retries
        else None
    )
    queue = Queue(settings.predict_queue, connection=client)
    datas = [
        Queue.prepare_data(
            names.BULK_CHUNK_JOB,
            (project, pinned, only_missing, chunk),
            job_id=chunk_id,
            timeout=settings.job_timeout,
            result_ttl=RESULT_TTL,
            failure_ttl=RESULT_TTL,
            description=f"predict project {project} with {pinned}: chunk {i + 1} of "
            f"{len(chunks)} ({len(chunk)} tasks)",
            retry=retry,
        )
        for i, (chunk_id, chunk) in enumerate(zip(ids, chunks, strict=True))
    ]
    planned = {
        "stage": "predicting",
        "run": run,
        "version": pinned,
        "model_version": known,
        "total": len(tasks),
        "unqueued": len(tasks) - len(todo),
        "chunks": ids,
    }
    with client.pipeline() as pipe:
        # The chunks and the planner's list of them in one transaction: a planner cut short
        # leaves neither chunks nobody counts nor a list of chunks never queued.
        queue.enqueue_many(datas, pipeline=pipe)
        if job is not None:
            job.meta.update(planned)
            pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        pipe.execute()
    log.info(
        "bulk_planned project=%s run=%s version=%s tasks=%s chunks=%s already=%s",
        project,
        run,
        pinned,
        len(tasks),
        len(chunks),
        len(tasks) - len(todo),
    )
    return {"project": project, "run": run, "version": pinned, "chunks": len(chunks)}


def pinned_bundle(
    settings: Settings, client: redis.Redis, project: str, version: str
) -> ModelBundle:
    """The models of ``version`` (a version's name or ``BASE``), whatever is live now.

    Raises VersionNotFound when the version is gone (pruned since the request)."""
    if version == BASE:
        return version_bundle(settings, None)
    registry = Registry.for_settings(settings, client)
    return version_bundle(settings, registry.local(registry.get(project, version)))


def predict_chunk(
    project: str, version: str, only_missing: bool, tasks: list[dict[str, Any]]
) -> dict[str, Any]:
    """rq entry point: predict one chunk's ``tasks`` with the pinned ``version`` and post the
    predictions to Label Studio. Its meta keeps which worker posted which task, after every
    post, so a retry posts only what no attempt did: one prediction per task however often
    the chunk runs. Raises what Label Studio or the models raise (rq retries the chunk);
    a task whose image fails is counted as failed, not raised."""
    settings = get_settings()
    client = job_redis(settings)
    job = get_current_job()
    worker = (job.worker_name if job is not None else None) or "-"
    earlier = dict(job.meta) if job is not None else {}
    written: dict[int, str] = {int(k): str(v) for k, v in (earlier.get("written") or {}).items()}
    progress = JobMetaWriter(job, every=0.0)  # every task: a retry must know what was posted
    workers = [*(earlier.get("workers") or []), worker]
    progress(workers=workers, done=0, total=len(tasks), predicted=0, failed=0, skipped=0)
    bundle = pinned_bundle(settings, client, project, version)
    predicted = failed = skipped = 0
    with StudioClient.from_settings(settings) as studio, ImageLoader(settings) as loader:
        config = parse_label_config(studio.project(project)["label_config"])
        predictor = Predictor(bundle, settings, loader.load_pixels)
        try:
            for i, task in enumerate(tasks, 1):
                task_id = int(task["id"])
                if task_id in written:  # posted by an earlier attempt of this chunk
                    predicted += 1
                elif only_missing and bundle.version in prediction_versions(task):
                    skipped += 1
                else:
                    prediction = predictor.predict_task(task, config)
                    if prediction.error is None:
                        studio.create_prediction(
                            task_id, prediction.result, prediction.score, bundle.version
                        )
                        written[task_id] = worker
                        predicted += 1
                    else:
                        failed += 1
                progress(
                    done=i,
                    predicted=predicted,
                    failed=failed,
                    skipped=skipped,
                    model_version=bundle.version,
                    written=written,
                )
        finally:
            predictor.close()
    log.info(
        "bulk_chunk_predicted project=%s version=%s worker=%s attempt=%s predicted=%s "
        "failed=%s skipped=%s",
        project,
        bundle.version,
        worker,
        len(workers),
        predicted,
        failed,
        skipped,
    )
    return {
        "project": project,
        "model_version": bundle.version,
        "worker": worker,
        "predicted": predicted,
        "failed": failed,
        "skipped": skipped,
        "total": len(tasks),
    }
