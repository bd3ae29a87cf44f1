"""The curators' page in a real browser (Debian's headless Chromium, driven by Playwright's
core): a backend with two versions and a training job in progress; the page shows both
with their metrics and the job; a click on "make live" changes what /predict serves."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.screenshot import CHROMIUM_ARGS, chromium
from servers import LiveServer, make_settings, start_uvicorn, stop_uvicorn
from tiny_models import draw_scene

from label_studio_sahi import names
from label_studio_sahi.images import load_local_image
from label_studio_sahi.predict import ModelBundle
from label_studio_sahi.queueing import fetch_job
from label_studio_sahi.redis_server import connect
from label_studio_sahi.registry import Registry
from label_studio_sahi.server import create_app
from label_studio_sahi.service import Service
from label_studio_sahi.training.job import _plot_curves
from label_studio_sahi.trigger import TrainingTrigger

pytestmark = pytest.mark.skipif(chromium() is None, reason="no chromium (apt-get install chromium)")

PROJECT = "4"
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="car"/><Label value="person"/></RectangleLabels></View>'
)


def checkpoint(source: Path, metrics: dict[str, float], tasks: int) -> Any:
    def write(folder: Path) -> None:
        shutil.copytree(source, folder / names.DETECTOR_DIR)
        loss = [2.0 / (1 + step / 20) for step in range(200)]  # as the job plots its own
        _plot_curves({"detector": loss}, folder / names.CURVES_FILE)

    meta = {
        names.META_STATUS: "accepted",
        names.META_METRICS: {"candidate": metrics, "live": {"map_50": 0.1}},
        "dataset": {"train_tasks": tasks, "heldout_tasks": 2},
    }
    return write, meta


@pytest.fixture
def backend(
    bundle: ModelBundle, redis_url: str, detector_dir: Path, tmp_path: Path
) -> Iterator[tuple[LiveServer, Registry, Path]]:
    settings = make_settings(
        model_dir=tmp_path / "models", redis_url=redis_url, classifier_model=""
    )
    registry = Registry.for_settings(settings, connect(redis_url))
    for metrics, tasks in (({"map": 0.21, "map_50": 0.52, "map_small": 0.18}, 10),
                           ({"map": 0.27, "map_50": 0.61, "map_small": 0.24}, 25)):  # fmt: skip
        write, meta = checkpoint(detector_dir, metrics, tasks)
        registry.publish(PROJECT, write, {**meta, names.META_PARENT: "base"})
    registry.set_live(PROJECT, "v2")
    # A training job in progress, its meta as a worker writes it (no worker takes it here).
    client = connect(redis_url)
    job = TrainingTrigger(client, settings).enqueue(PROJECT, reason="test", delay=0)
    job.meta.update(stage="training detector", step=120, steps=400, loss=0.8123, eta_seconds=95)
    job.save_meta()
    image = tmp_path / "scene.png"
    draw_scene(384, 256, 6, random.Random(3)).image.save(image)
    service = Service(
        settings,
        ModelBundle(bundle.detector, None),
        load_image=lambda url, _t: load_local_image(url, settings),
        redis_client=client,
    )
    live = start_uvicorn(create_app(settings, service))
    yield live, registry, image
    stop_uvicorn(live)
    assert fetch_job(client, job.id) is not None


def predicted_version(url: str, image: Path) -> str:
    body = {"tasks": [{"id": 1, "data": {"image": str(image)}}], "label_config": CONFIG,
            "project": f"{PROJECT}.1700000000"}  # fmt: skip
    answer = httpx.post(f"{url}/predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["results"][0]["model_version"])


def test_the_page_shows_versions_and_the_job_and_a_click_changes_the_live_version(
    backend: tuple[LiveServer, Registry, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    live, registry, image = backend
    assert predicted_version(live.url, image) == f"p{PROJECT}-v2"
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{live.url}/ui/{PROJECT}")
            assert page.inner_text("#live") == "v2"
            v1 = page.locator('tr[data-version="v1"]').inner_text()
            v2 = page.locator('tr[data-version="v2"]').inner_text()
            assert "0.520" in v1 and "0.210" in v1 and "10" in v1  # mAP@.5, mAP, training tasks
            assert "0.610" in v2 and "0.270" in v2 and "live" in v2
            job = page.locator('[data-job="training"]').inner_text()
            assert "training detector" in job and "step 120" in job and "eta_seconds 95" in job
            shot = tmp_path / "curators-page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("LS_SAHI_UI_SCREENSHOT_TO"):  # the README's (docs/curators-page.png)
                shutil.copy(shot, os.environ["LS_SAHI_UI_SCREENSHOT_TO"])

            page.locator('tr[data-version="v1"] button').click()  # "make live"
            page.wait_for_url(f"{live.url}/ui/{PROJECT}")
            assert page.inner_text("#live") == "v1"
        finally:
            browser.close()
    assert registry.live(PROJECT) == "v1"
    assert predicted_version(live.url, image) == f"p{PROJECT}-v1"  # this process swapped
    versions = httpx.get(f"{live.url}/versions", params={"project": PROJECT}, timeout=30).json()
    assert f"p{PROJECT}-v1" in versions["versions"]


def test_the_page_and_its_actions_need_the_login(
    backend: tuple[LiveServer, Registry, Path], redis_url: str, tmp_path: Path, bundle: ModelBundle
) -> None:
    settings = make_settings(
        model_dir=tmp_path / "auth-models", redis_url=redis_url, auth="basic",
        basic_auth_user="curator", basic_auth_pass="s3cret-pass",
    )  # fmt: skip
    guarded = start_uvicorn(
        create_app(settings, Service(settings, bundle, redis_client=connect(redis_url)))
    )
    try:
        assert httpx.get(f"{guarded.url}/ui/{PROJECT}").status_code == 401
        refused = httpx.post(f"{guarded.url}/ui/{PROJECT}/live", data={"version": "v1"})
        assert refused.status_code == 401
        assert json.loads(refused.text)["error"] == "unauthorized"
        ok = httpx.get(f"{guarded.url}/ui/{PROJECT}", auth=("curator", "s3cret-pass"))
        assert ok.status_code == 200 and "Versions" in ok.text
    finally:
        stop_uvicorn(guarded)


def test_the_loss_curves_of_a_version_are_served_and_a_missing_one_is_a_404(
    backend: tuple[LiveServer, Registry, Path],
) -> None:
    live, _, _ = backend
    page = httpx.get(f"{live.url}/ui/{PROJECT}").text
    assert f'src="/ui/{PROJECT}/v1/{names.CURVES_FILE}"' in page
    image = httpx.get(f"{live.url}/ui/{PROJECT}/v1/{names.CURVES_FILE}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    missing = httpx.get(f"{live.url}/ui/{PROJECT}/v9/{names.CURVES_FILE}")
    assert missing.status_code == 404 and "no version v9" in missing.json()["detail"]
