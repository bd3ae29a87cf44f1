"""The curators' page in a real browser (Debian's headless Chromium, driven by Playwright's
core), against a backend with two published versions, a Label Studio stand-in holding the
project's labelled tasks, and a real rq worker running the real fine-tuning job: the page
shows both versions with their metrics, the job's progress, the metrics plot and a task's
preview; a click on "make live" changes what /predict serves."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.screenshot import CHROMIUM_ARGS, chromium
from labelled_project import CONFIG
from stack import job_done, start_worker
from ui_backend import Backend, changed, serving_page

from label_studio_sahi import names
from label_studio_sahi.jobs.bulk import enqueue_bulk
from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.jobs.trigger import TrainingTrigger
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.fake_studio import FakeStudio
from testkit.servers import start_uvicorn, stop_uvicorn

pytestmark = pytest.mark.skipif(chromium() is None, reason="no chromium (apt-get install chromium)")


@pytest.fixture
def backend(
    bundle: ModelBundle, redis_url: str, detector_dir: Path, fake: FakeStudio, tmp_path: Path
) -> Iterator[Backend]:
    with serving_page(bundle, redis_url, detector_dir, fake, tmp_path) as running:
        yield running


@contextmanager
def training_in_progress(backend: Backend, folder: Path) -> Iterator[dict[str, Any]]:
    """A real worker process running the real fine-tuning job of the project, past its
    first logged step; killed (with its work horse) afterwards."""
    worker = start_worker(backend.settings, folder, "ui-worker")
    try:
        job = TrainingTrigger(backend.redis, backend.settings).enqueue(
            backend.project, reason="test", delay=0
        )
        deadline = time.monotonic() + 240
        while True:
            job.refresh()
            if job.meta.get("stage") == "training detector" and job.meta.get("step"):
                break
            assert not job_done(job, [worker]), worker.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no training step yet: {job.meta}"
            time.sleep(0.5)
        yield job.meta
    finally:
        worker.kill_with_work_horse()


def predicted(backend: Backend) -> dict[str, Any]:
    body = {"tasks": [{"id": backend.task, "data": {"image": backend.image_url}}],
            "label_config": CONFIG, "project": f"{backend.project}.1700000000"}  # fmt: skip
    answer = httpx.post(f"{backend.url}/predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["results"][0]
    return result


def test_the_page_shows_versions_job_metrics_and_a_preview_and_a_click_changes_the_live_version(
    backend: Backend, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    pid = backend.project
    assert predicted(backend)["model_version"] == f"p{pid}-v2"
    with training_in_progress(backend, tmp_path), sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{backend.url}/ui/{pid}?task={backend.task}&a=v2&b=base")
            assert page.inner_text("#live") == "v2"
            v1 = page.locator('tr[data-version="v1"]').inner_text()
            v2 = page.locator('tr[data-version="v2"]').inner_text()
            assert "0.520" in v1 and "0.210" in v1 and "10" in v1  # mAP@.5, mAP, training tasks
            assert "0.610" in v2 and "0.270" in v2 and "live" in v2
            job = page.locator('[data-job="training"]').inner_text()
            assert "started" in job and "training detector" in job, job
            assert "step " in job and "/20000" in job and "loss " in job and "ETA " in job, job
            for image in ("#metrics-plot", '[data-preview="v2"]', '[data-preview="base"]'):
                page.wait_for_function(
                    "s => { const i = document.querySelector(s); return i && i.complete"
                    " && i.naturalWidth > 0 }",
                    arg=image,
                    timeout=60_000,
                )
            shot = tmp_path / "curators-page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("LS_SAHI_UI_SCREENSHOT_TO"):  # the README's (docs/curators-page.png)
                shutil.copy(shot, os.environ["LS_SAHI_UI_SCREENSHOT_TO"])

            page.locator('tr[data-version="v1"] button').click()  # "make live"
            page.wait_for_url(f"{backend.url}/ui/{pid}")
            assert page.inner_text("#live") == "v1"
        finally:
            browser.close()
    assert backend.registry.live(pid) == "v1"
    assert predicted(backend)["model_version"] == f"p{pid}-v1"  # this process swapped
    versions = httpx.get(f"{backend.url}/versions", params={"project": pid}, timeout=30).json()
    assert f"p{pid}-v1" in versions["versions"]


def test_the_preview_draws_the_boxes_predict_suggests_and_refuses_bad_asks(
    backend: Backend, fake: FakeStudio
) -> None:
    pid, url = backend.project, f"{backend.url}/ui/{backend.project}/preview.png"
    served = predicted(backend)  # v2 is live
    for version in ("live", "v2", "v1"):  # v1: the same weights, loaded for the preview
        answer = httpx.get(url, params={"task": backend.task, "version": version}, timeout=60)
        assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG"), answer.text
        assert int(answer.headers["x-boxes"]) == len(served["result"]) > 0
    other = fake.add_task(fake.add_project("<View/>"), {"image": backend.image_url})
    refusals = {
        "abc": (400, "task must be a task id"),
        "999999": (404, "task 999999"),
        str(other): (404, f"is not in project {pid}"),
    }
    for task, (status, words) in refusals.items():
        answer = httpx.get(url, params={"task": task}, timeout=60)
        assert answer.status_code == status and words in answer.json()["detail"], answer.text
    missing = httpx.get(url, params={"task": backend.task, "version": "v9"}, timeout=60)
    assert missing.status_code == 404 and "no version v9" in missing.json()["detail"]


def test_a_failed_job_shows_its_reason(backend: Backend, tmp_path: Path) -> None:
    # A worker whose Label Studio key is wrong runs the real bulk-prediction job: it fails.
    wrong = changed(backend.settings, label_studio_api_key="not-the-key")
    job = enqueue_bulk(backend.redis, wrong, backend.project)
    worker = start_worker(wrong, tmp_path, "failing-worker")
    try:
        deadline = time.monotonic() + 120
        while not job_done(job, [worker]):
            assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        worker.stop()
    assert job.get_status(refresh=True) == "failed"
    page = httpx.get(f"{backend.url}/ui/{backend.project}", timeout=30).text
    line = page.split('data-job="bulk prediction">', 1)[1].split("</div>", 1)[0]
    assert "<b>failed</b>" in line and "reason: " in line and "401" in line, line
    assert "not-the-key" not in page  # the token never reaches the page


def test_the_page_and_its_actions_need_the_login(
    backend: Backend, redis_url: str, tmp_path: Path, bundle: ModelBundle
) -> None:
    settings = changed(
        backend.settings, auth="basic", basic_auth_user="curator", basic_auth_pass="s3cret-pass"
    )
    guarded = start_uvicorn(
        create_app(settings, Service(settings, bundle, redis_client=connect(redis_url)))
    )
    try:
        for path in ("", "/metrics.png", f"/preview.png?task={backend.task}"):
            assert httpx.get(f"{guarded.url}/ui/{backend.project}{path}").status_code == 401
        refused = httpx.post(f"{guarded.url}/ui/{backend.project}/live", data={"version": "v1"})
        assert refused.status_code == 401
        assert json.loads(refused.text)["error"] == "unauthorized"
        ok = httpx.get(f"{guarded.url}/ui/{backend.project}", auth=("curator", "s3cret-pass"))
        assert ok.status_code == 200 and "Versions" in ok.text
    finally:
        stop_uvicorn(guarded)


def test_the_loss_curves_and_the_metrics_plot_are_served_and_a_missing_version_is_a_404(
    backend: Backend,
) -> None:
    pid = backend.project
    page = httpx.get(f"{backend.url}/ui/{pid}").text
    assert f'src="/ui/{pid}/v1/{names.CURVES_FILE}"' in page
    for path in (f"v1/{names.CURVES_FILE}", "metrics.png"):
        image = httpx.get(f"{backend.url}/ui/{pid}/{path}", timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG")
    missing = httpx.get(f"{backend.url}/ui/{pid}/v9/{names.CURVES_FILE}")
    assert missing.status_code == 404 and "no version v9" in missing.json()["detail"]


def test_the_page_and_every_answer_carry_the_security_headers(backend: Backend) -> None:
    pid, url = backend.project, backend.url
    page = httpx.get(f"{url}/ui/{pid}")
    csp = page.headers["content-security-policy"]
    for rule in ("default-src 'self'", "frame-ancestors 'none'", "form-action 'self'",
                 "base-uri 'none'", "script-src 'sha256-", "style-src 'sha256-"):  # fmt: skip
        assert rule in csp, csp
    assert "unsafe-inline" not in csp and "data-confirm" in page.text
    answers = {
        "page": page,
        "metrics plot": httpx.get(f"{url}/ui/{pid}/metrics.png", timeout=60),
        "preview": httpx.get(f"{url}/ui/{pid}/preview.png", params={"task": backend.task},
                             timeout=60),
        "curves": httpx.get(f"{url}/ui/{pid}/v1/{names.CURVES_FILE}"),
        "health": httpx.get(f"{url}/health"),
        "an error": httpx.get(f"{url}/ui/{pid}/v9/{names.CURVES_FILE}"),
    }  # fmt: skip
    for what, answer in answers.items():
        assert answer.status_code in (200, 404), (what, answer.text)
        assert answer.headers["x-content-type-options"] == "nosniff", what
        assert answer.headers["x-frame-options"] == "DENY", what
        assert answer.headers["referrer-policy"] == "same-origin", what
        if what != "page":  # nothing else needs a script, a style or a frame
            assert answer.headers["content-security-policy"].startswith("default-src 'none'")
