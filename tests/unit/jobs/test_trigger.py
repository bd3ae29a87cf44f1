"""When training is queued: webhook events counted per project, one queued job per project."""

from __future__ import annotations

from typing import Any

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from label_studio_sahi.errors import Busy
from label_studio_sahi.jobs.trigger import TrainingTrigger
from label_studio_sahi.names import ENQUEUE_LOCK_KEY, TRAIN_JOB, train_job_id
from testkit.servers import make_settings


def _event(action: str, project: int = 1, **extra: Any) -> dict[str, Any]:
    return {"action": action, "project": {"id": project, "label_config": "<View/>"}, **extra}


def _trigger(redis_client: Any, **overrides: Any) -> TrainingTrigger:
    settings = make_settings(
        **{"train_after_annotations": 3, "train_debounce_seconds": 0, **overrides}
    )
    return TrainingTrigger(redis_client, settings)


def _queued(redis_client: Any) -> list[Job]:
    return Queue("ls-sahi-train", connection=redis_client).get_jobs()


def test_annotations_count_towards_the_trigger_then_one_job_is_queued(redis_client: Any) -> None:
    trigger = _trigger(redis_client)
    answers = [
        trigger.on_webhook(_event("ANNOTATION_CREATED", annotation={"id": i})) for i in range(2)
    ]
    assert [a[1]["changes"] for a in answers] == [1, 2]
    assert _queued(redis_client) == []
    status, body = trigger.on_webhook(_event("ANNOTATION_UPDATED"))
    assert status == 201 and body["job"] == train_job_id("1")
    [job] = _queued(redis_client)
    assert job.func_name == TRAIN_JOB and job.args[:2] == ("1", "3 annotation changes")


def test_webhook_enqueues_one_job_per_project(redis_client: Any) -> None:
    trigger = _trigger(redis_client)
    for _ in range(10):
        trigger.on_webhook(_event("ANNOTATION_CREATED", project=1))
        trigger.on_webhook(_event("ANNOTATION_CREATED", project=2))
    trigger.on_webhook(_event("START_TRAINING", project=1))
    assert sorted(j.id for j in _queued(redis_client)) == [train_job_id("1"), train_job_id("2")]


def test_train_button_queues_at_once(redis_client: Any) -> None:
    status, body = _trigger(redis_client).on_webhook(_event("START_TRAINING", project=7))
    assert status == 201 and body["job"] == train_job_id("7")
    assert [j.args[1] for j in _queued(redis_client)] == ["train button"]


def test_bulk_deletes_count_every_annotation(redis_client: Any) -> None:
    trigger = _trigger(redis_client)
    trigger.on_webhook(_event("ANNOTATIONS_DELETED", annotations=[{"id": 1}, {"id": 2}, {"id": 3}]))
    assert len(_queued(redis_client)) == 1


def test_other_actions_are_acknowledged_and_change_nothing(redis_client: Any) -> None:
    status, body = _trigger(redis_client).on_webhook(_event("PROJECT_UPDATED"))
    assert status == 200 and body["status"] == "Unknown event"
    assert _queued(redis_client) == []


def test_debounced_job_waits_in_the_schedule(redis_client: Any) -> None:
    trigger = _trigger(redis_client, train_after_annotations=1)
    trigger.settings = trigger.settings.model_copy(update={"train_debounce_seconds": 60})
    trigger.on_webhook(_event("ANNOTATION_CREATED"))
    trigger.on_webhook(_event("ANNOTATION_CREATED"))
    job = Job.fetch(train_job_id("1"), connection=redis_client)
    assert job.get_status() == JobStatus.SCHEDULED
    assert _queued(redis_client) == []


def test_a_finished_job_makes_room_for_the_next(redis_client: Any) -> None:
    trigger = _trigger(redis_client)
    first = trigger.enqueue("1", "first", delay=0)
    first.set_status(JobStatus.FINISHED)
    second = trigger.enqueue("1", "second", delay=0)
    assert second.id == first.id and second.args[1] == "second"
    assert second.args[2] != first.args[2]  # a new run id: a new run, not a retry


def test_events_during_a_running_job_are_kept_for_the_next_run(redis_client: Any) -> None:
    trigger = _trigger(redis_client)
    job = trigger.enqueue("1", "first", delay=0)
    job.set_status(JobStatus.STARTED)
    for _ in range(3):
        trigger.on_webhook(_event("ANNOTATION_CREATED"))
    assert int(redis_client.get("ls-sahi:changes:1")) == 3  # not lost
    job.set_status(JobStatus.FINISHED)
    trigger.on_webhook(_event("ANNOTATION_CREATED"))
    assert Job.fetch(train_job_id("1"), connection=redis_client).get_status() == JobStatus.QUEUED


def test_the_train_button_starts_a_job_that_waits_out_its_debounce(redis_client: Any) -> None:
    trigger = _trigger(redis_client, train_after_annotations=1)
    trigger.settings = trigger.settings.model_copy(update={"train_debounce_seconds": 600})
    trigger.on_webhook(_event("ANNOTATION_CREATED"))
    assert Job.fetch(train_job_id("1"), connection=redis_client).get_status() == JobStatus.SCHEDULED

    status, body = trigger.on_webhook(_event("START_TRAINING"))

    assert status == 201 and body["job_status"] == JobStatus.QUEUED
    [job] = _queued(redis_client)  # the same job, not a second one, and queued now
    assert job.id == train_job_id("1")
    assert Queue("ls-sahi-train", connection=redis_client).scheduled_job_registry.count == 0


def test_a_webhook_whose_project_is_not_an_object_is_refused_and_not_counted(
    redis_client: Any,
) -> None:
    trigger = _trigger(redis_client)
    for project in ("7", 7, ["7"], "1 2"):
        status, body = trigger.on_webhook({"action": "ANNOTATION_CREATED", "project": project})
        assert status == 400 and "project" in body["detail"], body
    for bad_id in ("1 2", "1:x", "a/b", -1, True, 10**20):
        status, body = trigger.on_webhook(_event("START_TRAINING", project=bad_id))  # type: ignore[arg-type]
        assert status == 400 and "project id" in body["detail"], body
    assert redis_client.keys("ls-sahi:changes:*") == [] and _queued(redis_client) == []


def test_a_held_enqueue_lock_answers_busy_at_once_instead_of_waiting(redis_client: Any) -> None:
    lock = redis_client.lock(ENQUEUE_LOCK_KEY.format(job_id=train_job_id("1")), timeout=30)
    assert lock.acquire()
    with pytest.raises(Busy) as refused:
        _trigger(redis_client).on_webhook(_event("START_TRAINING"))
    assert refused.value.status == 503 and "try again" in refused.value.message
    lock.release()
    assert _trigger(redis_client).on_webhook(_event("START_TRAINING"))[0] == 201


def test_a_change_count_expires_when_a_project_goes_quiet(redis_client: Any) -> None:
    _trigger(redis_client).on_webhook(_event("ANNOTATION_CREATED", project=3))
    assert 0 < redis_client.ttl("ls-sahi:changes:3") <= 30 * 24 * 3600
