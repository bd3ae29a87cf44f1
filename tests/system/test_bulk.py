"""Bulk predictions: a project's tasks in chunk jobs that every worker takes, written to
Label Studio with the version the request pinned."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from derived_versions import version_writer
from labelled_project import labelled_project
from rq import Queue, Worker
from rq.job import Job
from stack import Stack, stack_settings, start_stack, wait_for

from label_studio_sahi import names
from label_studio_sahi.versions.registry import Registry
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


class BlinkingStudio(FakeStudio):
    """Label Studio that answers 503 to the first prediction posted for ``blink_task``, as one
    behind a restarting proxy would: the chunk holding that task fails once."""

    def __init__(self) -> None:
        super().__init__()
        self.blink_task: int | None = None
        self.blinked = 0

    def handle(
        self, method: str, path: str, query: dict[str, str], body: Any, auth: str
    ) -> tuple[int, Any]:
        with self.lock:
            blink = (
                method == "POST"
                and path == "/api/predictions"
                and isinstance(body, dict)
                and body.get("task") == self.blink_task
                and not self.blinked
            )
            if blink:
                self.blinked += 1
                return 503, {"status_code": 503, "detail": "Service Unavailable"}
        return super().handle(method, path, query, body, auth)


def test_a_bulk_run_is_split_over_every_worker_one_chunk_retried_alone_one_version(
    redis_url: str, redis_client: Any, tmp_path: Path, detector_dir: Path
) -> None:
    with BlinkingStudio() as fake:
        project = labelled_project(fake, n_tasks=60, size=(256, 128))
        pid, tasks = str(project.id), project.task_ids
        chunk_size = 6
        fake.blink_task = tasks[3 * chunk_size + 2]  # the 3rd task of the 4th chunk
        settings = stack_settings(
            fake, redis_url, detector_dir, tmp_path / "models", bulk_chunk_tasks=chunk_size
        )
        registry = Registry.for_settings(settings, redis_client)
        pinned = registry.publish(pid, version_writer(detector_dir, "shift-boxes"), {})
        later = registry.publish(pid, version_writer(detector_dir, "swap-labels"), {})
        registry.set_live(pid, pinned.name)
        stack = start_stack(settings, tmp_path, workers=2)
        try:
            wait_for(lambda: len(Worker.all(connection=redis_client)) == 2, 120, "2 workers")
            run = _bulk_run(stack, pid, registry, later.name)
        finally:
            stack.stop()

    seen, final = run
    assert final["status"] == "finished", [w.log.read_text()[-3000:] for w in stack.workers]
    # Progress added up over the chunks at every poll, and ended at the total.
    for state in seen:
        assert state["done"] <= state["total"] == 60
        assert state["done"] == state["predicted"] + state["failed"] + state["skipped"]
    assert any(0 < s["done"] < 60 for s in seen), "no poll saw the run half done"
    assert final["result"] == {
        "project": pid,
        "model_version": pinned.model_version,
        "predicted": 60,
        "failed": 0,
        "skipped": 0,
        "total": 60,
    }
    assert final["chunks"] == {"total": 10, "waiting": 0, "running": 0, "finished": 10, "failed": 0}

    # Every task has exactly one prediction, of the version live at the request, though
    # another went live mid-run.
    assert Counter(p["task"] for p in fake.predictions) == Counter(tasks)
    assert {p["model_version"] for p in fake.predictions} == {pinned.model_version}
    assert fake.count("/api/predictions", "POST") == 60 + 1  # the refused one

    # Which worker posted which task, by the chunks' own record; rq agrees on the worker.
    planner = Job.fetch(names.bulk_job_id(pid), connection=redis_client)
    chunks = Job.fetch_many(planner.meta["chunks"], connection=redis_client)
    by_task = {t: w for c in chunks if c is not None for t, w in c.meta["written"].items()}
    assert sorted(by_task) == sorted(tasks)
    assert set(by_task.values()) == {"worker0", "worker1"}  # both workers took chunks
    assert final["workers"] == dict(sorted(Counter(by_task.values()).items()))
    for index, chunk in enumerate(chunks):
        assert chunk is not None
        own = tasks[index * chunk_size : (index + 1) * chunk_size]
        assert [t["id"] for t in chunk.args[3]] == own
        attempts = chunk.meta["workers"]
        if fake.blink_task in own:  # failed once, retried alone
            assert len(attempts) == 2, attempts
            first, second = attempts
            before = own[: own.index(fake.blink_task)]
            assert all(by_task[t] == first for t in before)  # not posted again
            assert all(by_task[t] == second for t in own if t not in before)
        else:
            assert attempts == [chunk.worker_name], (index, attempts)
            assert {by_task[t] for t in own} == {chunk.worker_name}


def _bulk_run(
    stack: Stack, pid: str, registry: Registry, next_live: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Request the run, request it again while it runs (reused), move the live version once
    the first chunk is done; every state polled, and the last."""
    queued = stack.post("/bulk-predict", {"project": int(pid)})
    assert queued.status_code == 202, queued.text
    seen: list[dict[str, Any]] = []
    moved = False
    run = None
    deadline = time.monotonic() + 600
    while True:
        state = httpx.get(f"{stack.server.url}/bulk-predict/{pid}", timeout=30).json()
        if "chunks" in state:
            seen.append(state)
            run = run or state["run"]
            assert state["run"] == run
            if not moved and state["done"] >= 6 and state["status"] == "started":
                again = stack.post("/bulk-predict", {"project": int(pid)})
                assert again.json() == {"job": queued.json()["job"], "status": "started"}
                registry.set_live(pid, next_live)
                moved = True
        if state["status"] in ("finished", "failed"):
            return seen, state
        assert time.monotonic() < deadline, f"the bulk run did not end: {state}"
        time.sleep(0.5)
