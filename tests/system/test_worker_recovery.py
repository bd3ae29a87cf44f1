"""A worker and its work horse killed mid-training, as a lost machine would be.

rq notices the job was abandoned once its heartbeat expires, a surviving worker's
maintenance pass re-queues it (rq ``Retry``), and it runs again to completion. No partial
checkpoint is ever listed or loaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labelled_project import labelled_project
from rq.job import Job, JobStatus
from stack import stack_settings, start_worker, wait_for

from label_studio_sahi.jobs.trigger import TrainingTrigger
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.tiny_models import random_detr

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[FakeStudio]:
    with FakeStudio() as studio:
        yield studio


def test_killed_worker_job_is_retried_by_another_worker_and_completes(
    fake: FakeStudio, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    project = labelled_project(fake, n_tasks=6)
    pid = str(project.id)
    settings = stack_settings(
        fake, redis_url, random_detr(tmp_path / "untrained"), tmp_path / "models", train_steps=400
    )
    registry = Registry.for_settings(settings, redis_client)
    first = start_worker(settings, tmp_path, "doomed")
    job = TrainingTrigger(redis_client, settings).enqueue(pid, "test", delay=0)

    def training() -> bool:
        job.refresh()
        return job.meta.get("stage") == "training detector" and job.meta.get("step", 0) >= 10

    wait_for(training, 120, "training to start")
    first.kill_with_work_horse()
    killed_at = time.monotonic()
    assert job.get_status(refresh=True) == JobStatus.STARTED  # nobody told rq
    assert registry.versions(pid) == []

    second = start_worker(settings, tmp_path, "survivor")
    try:
        wait_for(
            lambda: job.get_status(refresh=True) == JobStatus.FINISHED,
            420,
            "the retried job",
            every=1,
        )
    finally:
        second.stop()
    recovery = time.monotonic() - killed_at
    print(f"\nkilled mid-training -> finished on another worker: {recovery:.0f} s")

    versions = registry.versions(pid)
    assert [v.name for v in versions] == ["v1"], "one version, written once"
    assert (versions[0].path / "detector" / "model.safetensors").is_file()
    assert not list((settings.model_dir / "projects" / pid).glob(".tmp-*"))
    assert Job.fetch(job.id, connection=redis_client).return_value()["version"] == "v1"
