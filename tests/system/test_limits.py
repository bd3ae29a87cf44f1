"""Bounded by settings, not by what clients send: waiting requests, configs, loaded models;
and a limit that would refuse every request stops the backend at start, naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from derived_versions import version_writer
from labelled_project import CONFIG
from PIL import Image

from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings, SettingsError, read_settings
from label_studio_sahi.versions.bundles import ModelBundle
from label_studio_sahi.versions.registry import Registry
from testkit.servers import make_settings, start_uvicorn, stop_uvicorn

BODY = {"tasks": [{"id": 1, "data": {"image": "http://x/a.png"}}], "label_config": CONFIG}


@contextmanager
def held_backend(bundle: ModelBundle, **overrides: Any) -> Iterator[tuple[str, threading.Event]]:
    """A real server whose every image load waits for the event: requests pile up."""
    release = threading.Event()

    def slow_image(url: str, task_id: int | None) -> Image.Image:
        release.wait(30)
        return Image.new("RGB", (64, 48), "gray")

    settings = make_settings(**overrides)
    live = start_uvicorn(create_app(settings, Service(settings, bundle, load_image=slow_image)))
    try:
        yield live.url, release
    finally:
        release.set()
        stop_uvicorn(live)


def post_in_threads(url: str, count: int, answers: list[int]) -> list[threading.Thread]:
    def post() -> None:
        answers.append(httpx.post(f"{url}/predict", json=BODY, timeout=60).status_code)

    threads = [threading.Thread(target=post) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_requests_past_the_waiting_limit_get_503_and_the_rest_are_answered(
    bundle: ModelBundle,
) -> None:
    with held_backend(bundle, threads=1, max_waiting_requests=1) as (url, release):
        answers: list[int] = []
        running = []
        for _ in range(2):  # one runs, one waits
            running += post_in_threads(url, 1, answers)
            time.sleep(0.5)
        refused = httpx.post(f"{url}/predict", json=BODY, timeout=60)
        assert refused.status_code == 503 and "MAX_WAITING_REQUESTS" in refused.json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 200
        release.set()
        for thread in running:
            thread.join(60)
        assert answers == [200, 200]


def test_requests_arriving_together_are_admitted_up_to_threads_plus_waiting(
    bundle: ModelBundle,
) -> None:
    # THREADS=1, MAX_WAITING_REQUESTS=1: of 6 requests sent at once, 1 runs, 1 waits and 4
    # are refused at once, however the event loop interleaves their arrival.
    with held_backend(bundle, threads=1, max_waiting_requests=1) as (url, release):
        answers: list[int] = []
        running = post_in_threads(url, 6, answers)
        for _ in range(600):  # bounded: the 4 refusals come back while 2 are held
            if answers.count(503) == 4:
                break
            time.sleep(0.05)
        assert answers.count(503) == 4
        release.set()
        for thread in running:
            thread.join(60)
        assert sorted(answers) == [200, 200, 503, 503, 503, 503]


def test_configs_are_kept_within_their_byte_budget(bundle: ModelBundle) -> None:
    service = Service(make_settings(config_cache_bytes=3 * len(CONFIG)), bundle)
    config = parse_label_config(CONFIG)
    for project in range(10):
        service.remember_config(str(project), config, len(CONFIG))
    kept = [p for p in map(str, range(10)) if service.config_for(p) is not None]
    assert kept == ["7", "8", "9"]  # the most recent, within 3 configs' bytes
    service.close()


def test_past_max_project_models_the_least_recent_is_unloaded_and_reloaded_when_asked(
    bundle: ModelBundle, redis_url: str, redis_client: Any, tmp_path: Path, detector_dir: Path
) -> None:
    settings = make_settings(
        model_dir=tmp_path / "models", redis_url=redis_url, max_project_models=1
    )
    registry = Registry.for_settings(settings, redis_client)
    versions = {}
    for project in ("4", "5"):
        versions[project] = registry.publish(
            project, version_writer(detector_dir, "shift-boxes"), {"status": "accepted"}
        )
        registry.set_live(project, versions[project].name)
    service = Service(settings, bundle, redis_client=connect(redis_url))
    service.refresh(None)
    assert len(service.loaded_projects()) == 1

    for project in ("4", "5", "4"):
        assert service.version_for(project) == versions[project].model_version
        assert service.loaded_projects() == [project]
    service.close()


def test_with_max_waiting_requests_0_a_request_runs_when_a_thread_is_free_and_never_waits(
    bundle: ModelBundle,
) -> None:
    with held_backend(bundle, threads=1, max_waiting_requests=0) as (url, release):
        answers: list[int] = []
        running = post_in_threads(url, 1, answers)  # the one thread is free: it runs
        time.sleep(0.5)
        refused = httpx.post(f"{url}/predict", json=BODY, timeout=60)  # it would wait
        assert refused.status_code == 503 and "MAX_WAITING_REQUESTS=0" in refused.json()["detail"]
        release.set()
        running[0].join(60)
        assert answers == [200]
        # The thread is free again: the next request runs.
        assert httpx.post(f"{url}/predict", json=BODY, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("MAX_TASKS_PER_REQUEST", "0"),  # every /predict has at least one task
        ("MAX_REQUEST_BYTES", "1000"),  # below a labeling config's size
        ("MAX_IMAGE_BYTES", "0"),
        ("MAX_IMAGE_PIXELS", "0"),
        ("MAX_REQUEST_PIXELS", "0"),
        ("MAX_WAITING_REQUESTS", "-1"),
        ("THREADS", "0"),
        ("IMAGE_FETCH_CONCURRENCY", "0"),
        ("IMAGE_CONNECT_TIMEOUT", "0"),
        ("IMAGE_READ_TIMEOUT", "-1"),
        ("IMAGE_DOWNLOAD_DEADLINE", "0"),
        ("HEADER_TIMEOUT", "0"),
        ("BODY_DEADLINE", "-5"),
    ],
)
def test_a_limit_that_would_refuse_every_request_is_refused_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: str
) -> None:
    monkeypatch.setenv(setting, value)
    with pytest.raises(SettingsError) as err:
        read_settings(_env_file=None)
    assert err.value.message.startswith(f"invalid settings: {setting}={value}: ")
    assert "\n" not in err.value.message


def test_ls_sahi_serve_prints_one_line_naming_the_bad_setting(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in Settings.model_fields and k.upper() not in Settings.model_fields
    }
    env.update(MODEL_DIR=str(tmp_path), MAX_TASKS_PER_REQUEST="0", HEADER_TIMEOUT="0")
    run = subprocess.run(
        [sys.executable, "-m", "label_studio_sahi.cli", "serve"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("ls-sahi: error: invalid settings")
    assert "MAX_TASKS_PER_REQUEST=0" in run.stderr and "HEADER_TIMEOUT=0" in run.stderr
