"""Webhooks in -> one rq job -> a checkpoint published -> every server serves it.

Real parts: redis-server, an ``ls-sahi worker`` process (a real rq worker forking work
horses), the server under uvicorn, and a Label Studio stand-in serving an export in Label
Studio's format (the real Label Studio is the end-to-end test's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labelled_project import CONFIG, labelled_project
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from stack import Stack, job_done, stack_settings, start_stack, wait_for

from label_studio_sahi.names import train_job_id
from label_studio_sahi.training.finetune import training_steps
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.tiny_models import random_detr

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[FakeStudio]:
    with FakeStudio() as studio:
        yield studio


@pytest.fixture
def stack(fake: FakeStudio, redis_url: str, redis_client: Any, tmp_path: Path) -> Iterator[Stack]:
    untrained = random_detr(tmp_path / "untrained", seed=1)
    # 300 steps from random weights learn where the squares are, with low confidence yet:
    # serve every box above 0.05 so that the answer shows what the new model sees.
    settings = stack_settings(fake, redis_url, untrained, tmp_path / "models", score_threshold=0.05)
    running = start_stack(settings, tmp_path)
    yield running
    running.stop()


def _annotation_event(project: int, task: int) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": project, "label_config": CONFIG},
        "task": {"id": task},
        "annotation": {"id": task, "result": []},
    }


def test_webhooks_train_publish_and_every_server_serves_the_new_version(
    stack: Stack, fake: FakeStudio, redis_client: Any
) -> None:
    project = labelled_project(fake, n_tasks=8)
    pid = str(project.id)
    base = stack.post("/setup", {"project": pid, "schema": CONFIG}).json()["model_version"]
    assert base.startswith("untrained@")

    started = time.monotonic()
    answers = [stack.post("/webhook", _annotation_event(project.id, t)) for t in project.task_ids]
    assert all(a.status_code in (200, 201) for a in answers)
    # Exactly one job for the project, however many events arrived.
    job_ids = {a.json().get("job") for a in answers} - {None}
    assert job_ids == {train_job_id(pid)}
    queue = Queue("ls-sahi-train", connection=redis_client)
    waiting = len(queue.get_job_ids()) + len(StartedJobRegistry(queue=queue).get_job_ids())
    assert waiting <= 1

    job = Job.fetch(train_job_id(pid), connection=redis_client)
    wait_for(lambda: job_done(job, stack.workers), 300, "the training job")
    job.refresh()
    assert job.get_status() == JobStatus.FINISHED, stack.workers[0].log.read_text()[-3000:]
    result = job.return_value()
    assert result["status"] == "accepted", result
    steps = training_steps(result["dataset"]["windows"], stack.settings)
    assert job.meta["stage"] == "done" and job.meta["steps"] == steps
    assert FinishedJobRegistry(queue=queue).get_job_ids() == [train_job_id(pid)]

    registry = Registry.for_settings(stack.settings, redis_client)
    assert [v.name for v in registry.versions(pid)] == ["v1"] and registry.live(pid) == "v1"

    new = f"p{pid}-v1"
    wait_for(
        lambda: stack.post("/setup", {"project": pid}).json()["model_version"] == new,
        30,
        "the hot swap",
    )
    print(f"\nwebhook to new version served: {time.monotonic() - started:.1f} s")

    task = {
        "id": project.task_ids[0],
        "data": {"image": fake.tasks[project.task_ids[0]]["data"]["image"]},
    }
    answer = stack.post(
        "/predict", {"tasks": [task], "label_config": CONFIG, "project": f"{pid}.1700000000"}
    ).json()
    assert answer["results"][0]["model_version"] == new
    assert answer["results"][0]["result"], "the fine-tuned detector finds the squares"
    versions = stack.service.versions(pid)
    assert versions[0] == new and versions[-1] == base
    # Other projects still get the base model.
    assert stack.post("/setup", {"project": "999"}).json()["model_version"] == base
