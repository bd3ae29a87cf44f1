"""Faults: Redis going away and coming back, Label Studio down during a job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from derived_versions import version_writer
from http_origins import png
from labelled_project import CONFIG, labelled_project
from rq import Queue
from stack import stack_settings

from label_studio_sahi.jobs.redis_server import EmbeddedRedis, connect
from label_studio_sahi.labelstudio.client import StudioError
from label_studio_sahi.names import train_job_id
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.training.job import JobContext, run_training
from label_studio_sahi.versions.bundles import ModelBundle
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.servers import LEGACY_TOKEN, make_settings, start_uvicorn, stop_uvicorn
from testkit.tiny_models import random_detr


def test_redis_down_and_back_keeps_serving_and_loses_no_job_or_live_pointer(
    bundle: ModelBundle, tmp_path: Path, detector_dir: Path, files_server: tuple[str, Path]
) -> None:
    _, folder = files_server
    redis_server = EmbeddedRedis(tmp_path / "redis")
    url = redis_server.start()
    settings = make_settings(model_dir=tmp_path / "models", redis_url=url, swap_poll_seconds=0.5,
                             label_studio_url=files_server[0], label_studio_api_key=LEGACY_TOKEN)  # fmt: skip
    registry = Registry.for_settings(settings, connect(url))
    v1 = registry.publish("4", version_writer(detector_dir, "shift-boxes"), {"status": "accepted"})
    registry.set_live("4", v1.name)
    service = Service(settings, bundle, redis_client=connect(url))
    live = start_uvicorn(create_app(settings, service))
    (folder / "a.png").write_bytes(png(96, 64, "gray"))
    predict = {"tasks": [{"id": 1, "data": {"image": "/data/upload/a.png"}}],
               "label_config": CONFIG, "project": "4"}  # fmt: skip
    train = {"action": "START_TRAINING", "project": {"id": 4}}
    try:
        assert httpx.post(f"{live.url}/webhook", json=train).status_code == 201  # a queued job
        assert (
            httpx.post(f"{live.url}/predict", json=predict).json()["model_version"]
            == v1.model_version
        )

        redis_server.stop()  # Redis goes away
        answer = httpx.post(f"{live.url}/predict", json=predict, timeout=60)
        assert answer.status_code == 200 and answer.json()["model_version"] == v1.model_version
        health = httpx.get(f"{live.url}/health", timeout=30).json()
        assert health["status"] == "UP" and health["degraded"] == ["redis"]
        refused = httpx.post(f"{live.url}/webhook", json=train, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"] == "busy"

        redis_server = EmbeddedRedis(tmp_path / "redis")
        redis_server.start()  # back, from its append-only file
        assert "degraded" not in httpx.get(f"{live.url}/health").json()
        assert Registry.for_settings(settings, connect(url)).live("4") == v1.name
        assert train_job_id("4") in Queue(settings.train_queue, connection=connect(url)).job_ids
        assert httpx.post(f"{live.url}/webhook", json=train).status_code == 201
    finally:
        stop_uvicorn(live)
        redis_server.stop()


def test_label_studio_down_during_a_job_fails_it_clearly_for_rq_to_retry(
    tmp_path: Path, redis_client: Any
) -> None:
    with FakeStudio() as fake:
        project = labelled_project(fake, n_tasks=4)
        settings = stack_settings(fake, None, random_detr(tmp_path / "base"), tmp_path / "models")
    # The stand-in has stopped: connections are refused from here on.
    registry = Registry.for_settings(settings, redis_client)
    with pytest.raises(StudioError) as failed:
        run_training(JobContext(settings, registry), str(project.id), "test", "run-1")
    assert "cannot connect to Label Studio" in failed.value.message
    assert "LABEL_STUDIO_URL" in failed.value.message
    assert registry.versions(str(project.id)) == []  # nothing half-published
