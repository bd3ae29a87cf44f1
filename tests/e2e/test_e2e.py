"""The whole loop against a real Label Studio 1.23 and the backend started as the README starts it.

Label Studio runs from its own virtualenv (``scripts/label-studio-venv``; CI sets
``LS_SAHI_LS_PYTHON``). The backend is ``ls-sahi up`` (server + worker + embedded Redis)
with small models, as a user starts: a detector "pretrained" on another domain that already
finds some of the project's objects (the learning benchmark's base, testkit/scenes.py)
and the tiny trained scene classifier, at the default score threshold. Labelling the
project's large images and pressing Train must then promote a better detector. Everything
lives in the test's run folder and is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from labelled_project import SCENE_OF, png
from stack import wait_for_health

from e2e.screenshot import chromium, screenshot_task
from e2e.studio_server import StudioServer
from label_studio_sahi_plugin.connect import template
from testkit.scenes import export_result, target_scene
from testkit.tiny_models import SCENE_COLOURS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("LS_SAHI_LS_PYTHON"),
        reason="LS_SAHI_LS_PYTHON is not set (scripts/test sets it)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
N_UPLOADED, N_LOCAL = 6, 6
IMAGE_SIZE = (1024, 768)
LABEL_OF = {"car": "Vehicle", "truck": "Vehicle", "person": "Person"}  # the template's mapping


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Backend:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    model_dir: Path

    @property
    def client(self) -> httpx.Client:
        """Calls with the login the backend generated (it runs with AUTH=basic)."""
        login = json.loads((self.model_dir / "auth.json").read_text())
        return httpx.Client(base_url=self.url, auth=(login["user"], login["password"]), timeout=60)

    def stop(self) -> list[psutil.Process]:
        children = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return children


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-run")


@pytest.fixture(scope="module")
def studio(run_dir: Path) -> Iterator[StudioServer]:
    server = StudioServer(run_dir / "label-studio")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(
    studio: StudioServer, run_dir: Path, classifier_dir: Path, source_base_dir: Path
) -> Iterator[Backend]:
    """``ls-sahi up``, authenticated to Label Studio with a personal access token."""
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO", "REDIS", "DETECTOR", "CLASSIFIER"))
    }
    env.update(
        HOST="127.0.0.1", PORT=str(port), MODEL_DIR=str(run_dir / "models"), HF_HOME=str(run_dir / "hf"),
        HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", DEVICE="cpu",
        DETECTOR_MODEL=str(source_base_dir), CLASSIFIER_MODEL=str(classifier_dir),
        LABEL_STUDIO_URL=studio.url, LABEL_STUDIO_API_KEY=studio.personal_access_token(),
        LOCAL_FILES_DOCUMENT_ROOT=str(studio.document_root),
        # Slicing, training and thresholds are the defaults a user gets (SLICE_*=auto: the
        # base's own 128 px input, where 512 px windows would shrink its objects 4x).
        TORCH_THREADS="1",
        TRAIN_AFTER_ANNOTATIONS=str(N_UPLOADED + N_LOCAL), TRAIN_DEBOUNCE_SECONDS="0",
        SWAP_POLL_SECONDS="1", WORKER_MAINTENANCE_INTERVAL="5",
        # Auth as on a network (loopback would turn it off): a generated login, which
        # ls-sahi-connect must hand to Label Studio for predictions and webhooks to work.
        AUTH="basic",
    )  # fmt: skip
    log = run_dir / "backend.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    running = Backend(f"http://127.0.0.1:{port}", process, log, run_dir / "models")
    wait_for_health(running.url, process, log.read_text)
    yield running
    children = running.stop()
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _connect(studio: StudioServer, backend: Backend, api_key: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "LABEL_STUDIO_URL": studio.url, "LABEL_STUDIO_API_KEY": api_key,
           "MODEL_DIR": str(backend.model_dir)}  # where connect finds the backend's login  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "label_studio_sahi_plugin.connect", "--backend", backend.url, "--json", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _scene(i: int) -> tuple[bytes, list[dict[str, Any]]]:
    """A large image with small objects, and its annotation (every object, the scene class)."""
    kind = sorted(SCENE_COLOURS)[i % 2]
    scene = target_scene(500 + i, size=IMAGE_SIZE, ground=SCENE_COLOURS[kind])
    result = export_result(scene, template("boxes-scenes"), LABEL_OF)
    result.append(
        {
            "from_name": "scene",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [SCENE_OF[kind]]},
        }
    )
    return png(scene.image), result


def _predictions(studio: StudioServer, project: int) -> list[dict[str, Any]]:
    body = studio.api("GET", "/api/predictions", params={"project": project}).json()
    return list(body["results"] if isinstance(body, dict) else body)


def _retrieve(studio: StudioServer, project: int) -> None:
    answer = studio.api(
        "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
        json={"selectedItems": {"all": True, "excluded": []}}, timeout=300,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text


def _live_version(backend: Backend, project: int) -> str:
    return str(
        backend.client.post("/setup", json={"project": str(project)}).json()["model_version"]
    )


def test_label_studio_end_to_end(studio: StudioServer, backend: Backend, run_dir: Path) -> None:
    # 1. Wire a project in one command, with the legacy token; a second run changes nothing.
    wired = _connect(
        studio, backend, studio.legacy_token, "--title", "e2e survey", "--template", "boxes-scenes"
    )
    project = wired["project"]
    assert any("connected the ML backend" in line for line in wired["changes"])
    assert (
        _connect(
            studio,
            backend,
            studio.personal_access_token(),
            "--title",
            "e2e survey",
            "--template",
            "boxes-scenes",
        )["changes"]
        == []
    )
    base_version = _live_version(backend, project)
    # Without the login nobody else can train or write predictions through the backend.
    stranger = httpx.post(
        f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": project}}
    )
    assert stranger.status_code == 401

    # 2. Import images: by upload, and from local storage.
    scenes = [_scene(i) for i in range(N_UPLOADED + N_LOCAL)]
    files = {f"file{i}": (f"up{i}.png", scenes[i][0], "image/png") for i in range(N_UPLOADED)}
    assert studio.api("POST", f"/api/projects/{project}/import", files=files).status_code in (
        200,
        201,
    )
    local = studio.document_root / "squares"
    local.mkdir(parents=True, exist_ok=True)
    for i in range(N_UPLOADED, N_UPLOADED + N_LOCAL):
        (local / f"local{i}.png").write_bytes(scenes[i][0])
    storage = {"project": project, "title": "squares", "path": str(local), "use_blob_urls": True}
    assert studio.api("POST", "/api/storages/localfiles", json=storage).status_code in (200, 201)
    imported = [
        {"data": {"image": f"/data/local-files/?d=squares/local{i}.png"}}
        for i in range(N_UPLOADED, N_UPLOADED + N_LOCAL)
    ]
    assert studio.api("POST", f"/api/projects/{project}/import", json=imported).status_code in (
        200,
        201,
    )
    tasks = studio.api("GET", "/api/tasks", params={"project": project, "page_size": 100}).json()
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    assert len(tasks) == N_UPLOADED + N_LOCAL
    urls = sorted(t["data"]["image"] for t in tasks)
    assert (
        sum("/data/upload/" in u for u in urls) == N_UPLOADED
        and sum("/data/local-files/" in u for u in urls) == N_LOCAL
    )

    # 3. Predictions appear in Label Studio, made by the backend's model version.
    _retrieve(studio, project)
    predictions = _predictions(studio, project)
    assert {p["task"] for p in predictions} == {t["id"] for t in tasks}
    assert {p["model_version"] for p in predictions} == {base_version}
    assert all(any(r["type"] == "choices" for r in p["result"]) for p in predictions)
    # The base model, trained on another domain, already finds objects in these images.
    assert any(r["type"] == "rectanglelabels" for p in predictions for r in p["result"])

    # 4. Annotations created through the API reach the backend, and training by count runs.
    for i in range(N_UPLOADED + N_LOCAL):
        name = f"up{i}.png" if i < N_UPLOADED else f"local{i}.png"
        task = next(t for t in tasks if t["data"]["image"].endswith(name))  # uploads get a prefix
        answer = studio.api(
            "POST", f"/api/tasks/{task['id']}/annotations", json={"result": scenes[i][1]}
        )
        assert answer.status_code == 201, answer.text
    metrics = backend.client.get("/metrics").text
    webhooks = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('ls_sahi_requests_total{route="/webhook"')
    )
    assert webhooks >= N_UPLOADED + N_LOCAL

    # The labels pay off: the first fine-tuned version beats the base on held-out tasks and
    # goes live (the gate refuses one that does not).
    first = _wait_for_new_version(backend, project, base_version)
    assert first == f"p{project}-v1"
    meta = json.loads(
        (run_dir / "models" / "projects" / str(project) / "v1" / "meta.json").read_text()
    )
    held_out = meta["metrics"]
    assert meta["status"] == "accepted" and meta["decision"]["detector"]["promoted"], meta[
        "decision"
    ]
    assert held_out["live"]["map_50"] > 0, "the base already detects something"
    assert meta["dataset"]["window"] == [128, 128]  # trained and judged at the served window
    assert held_out["candidate"]["map_50"] > held_out["live"]["map_50"]

    # 5. The Train button trains again and publishes another version.
    [ml] = [
        m
        for m in studio.api("GET", "/api/ml", params={"project": project}).json()
        if m["url"].rstrip("/") == backend.url
    ]
    assert studio.api("POST", f"/api/ml/{ml['id']}/train", json={}).status_code in (200, 201)
    _wait_for_versions(backend, project, 2)

    # 6. Label Studio retrieves predictions of the new version (for a new image too).
    fresh_png, _ = _scene(N_UPLOADED + N_LOCAL)
    fresh = {"file": ("fresh.png", fresh_png, "image/png")}
    assert studio.api("POST", f"/api/projects/{project}/import", files=fresh).status_code in (
        200,
        201,
    )
    tasks = studio.api("GET", "/api/tasks", params={"project": project, "page_size": 100}).json()[
        "tasks"
    ]
    live = _live_version(backend, project)
    assert live != base_version
    _retrieve(studio, project)
    newest = [p for p in _predictions(studio, project) if p["model_version"] == live]
    assert {p["task"] for p in newest} == {t["id"] for t in tasks}
    assert any(r["type"] == "rectanglelabels" for p in newest for r in p["result"])
    versions = studio.api("GET", f"/api/ml/{ml['id']}/versions").json()
    assert live in json.dumps(versions)

    # 7. Bulk predictions for curators: every task again, written through Label Studio's API.
    before = len(_predictions(studio, project))
    queued = backend.client.post("/bulk-predict", json={"project": project, "only_missing": False})
    assert queued.status_code == 202

    def bulk_done() -> dict[str, Any] | None:
        progress = backend.client.get(f"/bulk-predict/{project}").json()
        return progress if progress["status"] in ("finished", "failed") else None

    deadline = time.monotonic() + 180
    while (progress := bulk_done()) is None and time.monotonic() < deadline:
        time.sleep(1)
    assert progress and progress["status"] == "finished", backend.log.read_text()[-3000:]
    assert (
        progress["result"]["predicted"] == len(tasks)
        and progress["result"]["model_version"] == live
    )
    assert len(_predictions(studio, project)) == before + len(tasks)

    # The curators' page lists the versions and previews a task: read from Label Studio
    # (the task, its labeling config, its uploaded image), drawn with the live version's boxes.
    assert live in backend.client.get(f"/ui/{project}").text
    boxed = next(
        p["task"] for p in newest if any(r["type"] == "rectanglelabels" for r in p["result"])
    )
    preview = backend.client.get(
        f"/ui/{project}/preview.png", params={"task": boxed, "version": "live"}
    )
    assert preview.status_code == 200, preview.text[:1000]
    assert preview.content.startswith(b"\x89PNG") and int(preview.headers["x-boxes"]) > 0

    # 8. What the annotator sees: the new image with the backend's pre-annotations.
    if chromium() is None:
        print("\nno chromium: screenshot skipped")
        return
    new_task = next(t for t in tasks if t["data"]["image"].endswith("fresh.png"))
    shot = screenshot_task(
        studio, project, new_task["id"], run_dir / "label-studio-predictions.png"
    )
    assert shot.stat().st_size > 20_000
    if os.environ.get("LS_SAHI_SCREENSHOT_TO"):
        shutil.copy(shot, os.environ["LS_SAHI_SCREENSHOT_TO"])


def _wait_for_new_version(backend: Backend, project: int, old: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        version = _live_version(backend, project)
        if version != old:
            return version
        time.sleep(1)
    raise AssertionError(f"no new version after {timeout} s:\n{backend.log.read_text()[-4000:]}")


def _wait_for_versions(backend: Backend, project: int, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        versions = backend.client.get("/versions", params={"project": str(project)}).json()[
            "versions"
        ]
        if len([v for v in versions if v.startswith(f"p{project}-")]) >= count:
            return
        time.sleep(1)
    raise AssertionError(
        f"fewer than {count} versions after {timeout} s:\n{backend.log.read_text()[-4000:]}"
    )
