"""Bulk predictions: one job predicts a project's tasks and writes them to Label Studio."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from labelled_project import labelled_project
from rq import Queue
from stack import Stack, stack_settings, start_stack, wait_for

from label_studio_sahi import names
from testkit.fake_studio import FakeStudio

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[FakeStudio]:
    with FakeStudio() as studio:
        yield studio


@pytest.fixture
def stack(
    fake: FakeStudio, redis_url: str, redis_client: Any, tmp_path: Path, detector_dir: Path
) -> Iterator[Stack]:
    running = start_stack(
        stack_settings(fake, redis_url, detector_dir, tmp_path / "models"), tmp_path
    )
    yield running
    running.stop()


def test_bulk_job_predicts_tasks_without_a_current_prediction_and_writes_them(
    stack: Stack, fake: FakeStudio
) -> None:
    project = labelled_project(fake, n_tasks=4)
    version = stack.service.base_version
    already = project.task_ids[0]
    fake.tasks[already]["predictions"].append({"id": 999, "model_version": version, "result": []})

    queued = stack.post("/bulk-predict", {"project": project.id})
    assert queued.status_code == 202 and queued.json()["job"] == f"ls-sahi-predict-{project.id}"

    def finished() -> Any:
        answer = httpx.get(f"{stack.server.url}/bulk-predict/{project.id}").json()
        return answer if answer["status"] in ("finished", "failed") else None

    progress = wait_for(finished, 180, "the bulk prediction job", every=0.5)
    assert progress["status"] == "finished", stack.workers[0].log.read_text()[-3000:]
    assert progress["result"] == {
        "project": str(project.id),
        "model_version": version,
        "predicted": 3,
        "failed": 0,
        "skipped": 1,
        "total": 4,
    }
    assert progress["done"] == 4 and progress["total"] == 4
    written = {p["task"]: p for p in fake.predictions}
    assert set(written) == set(project.task_ids[1:])
    for prediction in written.values():
        assert prediction["model_version"] == version and prediction["result"]
        assert prediction["result"][0]["type"] == "rectanglelabels"


def test_a_bulk_job_queued_under_the_path_before_subpackages_still_runs(
    stack: Stack, fake: FakeStudio, redis_client: Any
) -> None:
    """rq stores a job's function as a dotted path; an upgrade must not strand a queued job."""
    project = labelled_project(fake, n_tasks=2)
    Queue(stack.service.settings.predict_queue, connection=redis_client).enqueue(
        "label_studio_sahi.bulk_predict.predict_project",  # the path of the previous layout
        str(project.id),
        True,
        job_id=names.bulk_job_id(str(project.id)),
    )

    def finished() -> Any:
        answer = httpx.get(f"{stack.server.url}/bulk-predict/{project.id}").json()
        return answer if answer["status"] in ("finished", "failed") else None

    progress = wait_for(finished, 180, "the bulk job queued under the old path", every=0.5)
    assert progress["status"] == "finished", stack.workers[0].log.read_text()[-3000:]
    assert progress["result"]["predicted"] == 2
    assert all(fake.tasks[t]["predictions"] for t in project.task_ids)
