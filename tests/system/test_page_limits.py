"""The curators' page under the limits /predict is under: THREADS and MAX_WAITING_REQUESTS
for its previews (503 past them), in threads of its own so that /health, /predict and the
page itself answer while previews wait on a slow Label Studio; MAX_REQUEST_PIXELS for a
preview's image; MAX_REQUEST_BYTES for its forms (413)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from labelled_project import CONFIG
from ui_backend import Backend, serving_page

from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.fake_studio import FakeStudio

PREVIEWS = 6


@pytest.fixture
def setup(
    bundle: ModelBundle, redis_url: str, detector_dir: Path, fake: FakeStudio, tmp_path: Path
) -> dict[str, Any]:
    connect(redis_url).flushall()
    return {"bundle": bundle, "redis_url": redis_url, "detector_dir": detector_dir,
            "fake": fake, "folder": tmp_path}  # fmt: skip


class HeldTasks:
    """Label Studio made slow: its task API answers only once released (the images and
    the rest of its API answer at once)."""

    def __init__(self, fake: FakeStudio) -> None:
        self.release = threading.Event()
        self.arrived = threading.Semaphore(0)
        original = fake.handle

        def handle(method: str, path: str, query: Any, body: Any, auth: str) -> Any:
            if re.fullmatch(r"/api/tasks/\d+/?", path):
                self.arrived.release()
                self.release.wait(120)
            return original(method, path, query, body, auth)

        fake.handle = handle  # type: ignore[method-assign]


@pytest.fixture
def held(setup: dict[str, Any]) -> Iterator[tuple[Backend, HeldTasks]]:
    with serving_page(**setup, threads=1, max_waiting_requests=1) as backend:
        tasks = HeldTasks(setup["fake"])
        try:
            yield backend, tasks
        finally:
            tasks.release.set()


def test_previews_past_the_limits_get_503_while_health_predict_and_the_page_answer(
    held: tuple[Backend, HeldTasks],
) -> None:
    backend, tasks = held
    url = f"{backend.url}/ui/{backend.project}/preview.png"
    with ThreadPoolExecutor(PREVIEWS) as pool:
        asked = [
            pool.submit(httpx.get, url, params={"task": backend.task}, timeout=180)
            for _ in range(PREVIEWS)
        ]
        # THREADS=1 preview asks Label Studio (and is held there), MAX_WAITING_REQUESTS=1
        # waits for it; the other four are refused at once.
        assert tasks.arrived.acquire(timeout=60)
        deadline = time.monotonic() + 60
        while sum(f.done() for f in asked) < PREVIEWS - 2:
            assert time.monotonic() < deadline, [f.result().text for f in asked if f.done()]
            time.sleep(0.05)
        refused = [f.result() for f in asked if f.done()]
        waiting = [f for f in asked if not f.done()]
        assert [r.status_code for r in refused] == [503] * (PREVIEWS - 2)
        for answer in refused:
            error = answer.json()
            assert error["error"] == "busy" and "MAX_WAITING_REQUESTS=1" in error["detail"]
            assert "THREADS=1" in error["detail"]
        # Held previews take nothing from the rest of the backend.
        assert httpx.get(f"{backend.url}/health", timeout=30).status_code == 200
        body = {"tasks": [{"id": backend.task, "data": {"image": backend.image_url}}],
                "label_config": CONFIG, "project": backend.project}  # fmt: skip
        predicted = httpx.post(f"{backend.url}/predict", json=body, timeout=120)
        assert predicted.status_code == 200 and predicted.json()["results"][0]["result"]
        page = httpx.get(f"{backend.url}/ui/{backend.project}", timeout=30)
        assert page.status_code == 200 and "Versions" in page.text
        # Still held: one at Label Studio, one waiting for its thread (it never asked).
        assert not any(f.done() for f in waiting) and not tasks.arrived.acquire(timeout=0)
        tasks.release.set()
        served = [f.result(timeout=120) for f in waiting]
    assert [a.status_code for a in served] == [200, 200]
    assert all(a.content.startswith(b"\x89PNG") for a in served)


def test_a_preview_counts_its_image_against_max_request_pixels(setup: dict[str, Any]) -> None:
    with serving_page(**setup, max_request_pixels=1000) as backend:
        answer = httpx.get(
            f"{backend.url}/ui/{backend.project}/preview.png",
            params={"task": backend.task},
            timeout=60,
        )
    assert answer.status_code == 413, answer.text
    error = answer.json()
    assert error["error"] == "image_too_large" and "MAX_REQUEST_PIXELS" in error["detail"]


def test_a_form_over_max_request_bytes_is_refused(setup: dict[str, Any]) -> None:
    with serving_page(**setup, max_request_bytes=2**20) as backend:
        pid = backend.project
        page = httpx.get(f"{backend.url}/ui/{pid}").text
        token = re.search(r'name="token" value="([0-9a-f]+)"', page)
        assert token is not None
        form = {"version": "v1", "token": token[1]}
        big = httpx.post(
            f"{backend.url}/ui/{pid}/live", data={**form, "pad": "x" * 3 * 2**20}, timeout=60
        )
        assert big.status_code == 413, big.text
        assert big.json()["error"] == "request_too_large"
        assert "MAX_REQUEST_BYTES=1048576" in big.json()["detail"]
        assert backend.registry.live(pid) == "v2"
        # No Content-Length to go by (chunked): the reader stops at the limit all the same.
        chunks = (b"version=v1&token=" + token[1].encode(), b"&pad=" + b"x" * 2**20, b"x" * 2**20)
        streamed = httpx.post(
            f"{backend.url}/ui/{pid}/live",
            content=iter(chunks),
            headers={"content-type": "application/x-www-form-urlencoded"},
            timeout=60,
        )
        assert streamed.status_code == 413 and backend.registry.live(pid) == "v2"
        small = httpx.post(f"{backend.url}/ui/{pid}/live", data=form, timeout=60)
        assert small.status_code == 303 and backend.registry.live(pid) == "v1"
