"""The ML backend over real HTTP (uvicorn), with small trained models and real image URLs."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from labelled_project import CONFIG_WITH_SCENES
from PIL import Image

from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import LEGACY_TOKEN, LiveServer, make_settings, start_uvicorn, stop_uvicorn
from testkit.tiny_models import draw_scene

CONFIG = CONFIG_WITH_SCENES  # boxes (car -> Vehicle) and a scene Choices tag


@pytest.fixture
def backend(
    bundle: ModelBundle, files_server: tuple[str, Path], tmp_path: Path
) -> Iterator[LiveServer]:
    ls_url, _ = files_server
    settings = make_settings(
        label_studio_url=ls_url,
        label_studio_api_key=LEGACY_TOKEN,
        local_files_document_root=tmp_path / "local",
        max_tasks_per_request=4,
        max_request_bytes=200_000,
        max_image_pixels=2_000_000,
        allowed_image_formats=["PNG", "JPEG"],
    )
    (tmp_path / "local").mkdir()
    live = start_uvicorn(create_app(settings, Service(settings, bundle)))
    yield live
    stop_uvicorn(live)


def put_scene(
    folder: Path, name: str, width: int = 512, height: int = 384, n: int = 6, seed: int = 1
) -> Any:
    scene = draw_scene(width, height, n, random.Random(seed))
    scene.image.save(folder / name)
    return scene


def post(live: LiveServer, route: str, body: Any) -> httpx.Response:
    return httpx.post(f"{live.url}{route}", json=body, timeout=60)


def test_health_and_setup_report_the_model_version(
    backend: LiveServer, bundle: ModelBundle
) -> None:
    health = httpx.get(f"{backend.url}/health").json()
    assert health["status"] == "UP" and health["model_class"]
    setup = post(
        backend, "/setup", {"project": "3", "schema": CONFIG, "hostname": "http://ls"}
    ).json()
    assert setup["model_version"] == bundle.version
    assert bundle.detector is not None and bundle.detector.version in setup["model_version"]


def test_predict_returns_boxes_and_choices_in_label_studio_format(
    backend: LiveServer, files_server: tuple[str, Path], bundle: ModelBundle
) -> None:
    _, folder = files_server
    scene = put_scene(folder, "scene.png")
    body = {
        "tasks": [{"id": 7, "data": {"image": "/data/upload/scene.png"}}],
        "label_config": CONFIG,
        "project": "1.1700000000",
    }
    answer = post(backend, "/predict", body)
    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()["results"]
    assert prediction["model_version"] == bundle.version
    boxes = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
    choices = [r for r in prediction["result"] if r["type"] == "choices"]
    assert boxes, "the trained detector finds the squares"
    for r in boxes:
        assert r["from_name"] == "label" and r["to_name"] == "image"
        assert (r["original_width"], r["original_height"]) == (512, 384)
        value = r["value"]
        assert set(value) == {"x", "y", "width", "height", "rotation", "rectanglelabels"}
        assert 0 <= value["x"] <= 100 and 0 < value["width"] <= 100
        assert value["rectanglelabels"][0] in {
            "Vehicle",
            "Person",
        }  # "car" mapped through predicted_values
        assert 0.3 <= r["score"] <= 1
    # Boxes are where the squares are: every predicted box overlaps a drawn square.
    truth = [
        (b, {"car": "Vehicle", "person": "Person"}[lab])
        for b, lab in zip(scene.boxes, scene.labels, strict=True)
    ]
    hits = 0
    for r in boxes:
        v = r["value"]
        x1, y1 = v["x"] * 5.12, v["y"] * 3.84
        x2, y2 = x1 + v["width"] * 5.12, y1 + v["height"] * 3.84
        if any(
            _iou((x1, y1, x2, y2), b) > 0.3 and label == v["rectanglelabels"][0]
            for b, label in truth
        ):
            hits += 1
    assert hits >= len(scene.boxes) // 2
    assert choices and choices[0]["value"]["choices"] == ["Street"]  # grey background
    # The task score is the default one, total_uncertainty: 1 / (1 + the summed doubt).
    items = [r["score"] for r in prediction["result"]]
    assert prediction["score"] == pytest.approx(1 / (1 + sum(1 - s for s in items)))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_a_failing_task_gets_an_empty_result_and_the_others_are_answered(
    backend: LiveServer, files_server: tuple[str, Path]
) -> None:
    _, folder = files_server
    put_scene(folder, "ok.png")
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/ok.png"}},
        {"id": 2, "data": {"image": "/data/upload/missing.png"}},
        {"id": 3, "data": {"image": "/data/upload/ok.png"}},
    ]
    answer = post(backend, "/predict", {"tasks": tasks, "label_config": CONFIG})
    assert answer.status_code == 200
    body = answer.json()
    results = body["results"]
    assert len(results) == 3
    assert results[0]["result"] and results[2]["result"]
    assert results[1]["result"] == [] and results[1]["score"] == 0
    assert results[1]["error"]["error"] == "image_unreachable"
    assert body["errors"] == [
        {
            "index": 1,
            "task": 2,
            **{k: body["errors"][0][k] for k in ("error", "detail", "status_code")},
        }
    ]
    assert "404" in body["errors"][0]["detail"]


def _png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "gray").save(out, "PNG")
    return out.getvalue()


def _bad_cases(files: Path, local: Path) -> dict[str, tuple[Any, int, str]]:
    """name -> (request body or raw bytes, expected status, text the error must contain)."""
    (files / "truncated.png").write_bytes(_png_bytes()[:60])
    (files / "huge.png").write_bytes(_png_bytes((2000, 1500)))
    Image.new("RGB", (8, 8)).save(files / "anim.gif")
    (local / "fine.png").write_bytes(_png_bytes())
    task = lambda url: {"tasks": [{"id": 1, "data": {"image": url}}], "label_config": CONFIG}  # noqa: E731
    return {
        "not json": (b"{not json", 400, "not valid JSON"),
        "missing tasks": ({"label_config": CONFIG}, 400, "tasks"),
        "tasks not a list": ({"tasks": "x", "label_config": CONFIG}, 400, "tasks"),
        "unsupported config": (
            {"tasks": [], "label_config": "<View><Text name='t' value='$t'/></View>"},
            422,
            "RectangleLabels",
        ),
        "malformed config": ({"tasks": [], "label_config": "<View>"}, 422, "XML"),
        "no image url": ({"tasks": [{"id": 1, "data": {}}], "label_config": CONFIG}, 400, "image"),
        "loopback url": (task("http://127.0.0.1:9/x.png"), 403, "EGRESS_ALLOW"),
        "unreachable url": (task("http://no-such-host.invalid/x.png"), 424, "no-such-host.invalid"),
        "forbidden scheme": (task("file:///etc/passwd"), 400, "file"),
        "path outside root": (task("/data/local-files/?d=../../etc/passwd"), 403, "outside"),
        "truncated image": (task("/data/upload/truncated.png"), 415, "truncated"),
        "oversized image": (task("/data/upload/huge.png"), 413, "MAX_IMAGE_PIXELS"),
        "unsupported format": (task("/data/upload/anim.gif"), 415, "GIF"),
        "too many tasks": (
            {"tasks": [{"id": i, "data": {}} for i in range(5)], "label_config": CONFIG},
            413,
            "MAX_TASKS_PER_REQUEST",
        ),
        "body too large": ({"tasks": [], "label_config": "x" * 300_000}, 413, "MAX_REQUEST_BYTES"),
    }


def test_bad_input_gets_a_4xx_json_error_naming_the_problem_and_the_server_stays_up(
    backend: LiveServer, files_server: tuple[str, Path], tmp_path: Path
) -> None:
    _, folder = files_server
    for name, (body, status, text) in _bad_cases(folder, tmp_path / "local").items():
        if isinstance(body, bytes):
            answer = httpx.post(
                f"{backend.url}/predict", content=body, headers={"content-type": "application/json"}
            )
        else:
            answer = post(backend, "/predict", body)
        assert answer.status_code == status, f"{name}: {answer.status_code} {answer.text}"
        error = answer.json()
        assert error["status_code"] == status and text.lower() in error["detail"].lower(), (
            f"{name}: {error}"
        )
        assert httpx.get(f"{backend.url}/health").status_code == 200, f"server down after {name}"


def test_local_files_are_read_under_the_document_root(backend: LiveServer, tmp_path: Path) -> None:
    put_scene(tmp_path / "local", "a.png")
    body = {
        "tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"}}],
        "label_config": CONFIG,
    }
    answer = post(backend, "/predict", body)
    assert answer.status_code == 200 and answer.json()["results"][0]["result"]


def test_predict_without_config_uses_the_one_from_setup(
    backend: LiveServer, files_server: tuple[str, Path]
) -> None:
    _, folder = files_server
    put_scene(folder, "s.png")
    post(backend, "/setup", {"project": "5", "schema": CONFIG})
    answer = post(
        backend,
        "/predict",
        {"tasks": [{"id": 1, "data": {"image": "/data/upload/s.png"}}], "project": "5.123"},
    )
    assert answer.status_code == 200 and answer.json()["results"][0]["result"]
    unknown = post(backend, "/predict", {"tasks": [], "project": "6.1"})
    assert unknown.status_code == 400 and "label_config" in unknown.json()["detail"]


def test_metrics_are_prometheus_text_with_requests_stages_and_version(
    backend: LiveServer, files_server: tuple[str, Path], bundle: ModelBundle
) -> None:
    _, folder = files_server
    put_scene(folder, "m.png")
    post(
        backend,
        "/predict",
        {"tasks": [{"id": 1, "data": {"image": "/data/upload/m.png"}}], "label_config": CONFIG},
    )
    text = httpx.get(f"{backend.url}/metrics").text
    assert 'ls_sahi_requests_total{route="/predict",status="200"}' in text
    for stage in ("fetch", "slice", "detector", "merge", "classifier"):
        assert f'ls_sahi_stage_seconds_count{{stage="{stage}"}}' in text
    assert f'model_version="{bundle.version}"' in text


def test_made_up_paths_add_no_metric_series(backend: LiveServer) -> None:
    def series() -> int:
        text = httpx.get(f"{backend.url}/metrics").text
        return sum(line.startswith("ls_sahi_requests_total{") for line in text.splitlines())

    httpx.get(f"{backend.url}/bulk-predict/1")  # a templated route: one series for all ids
    before = series()
    for i in range(300):
        httpx.get(f"{backend.url}/no/such/path/{i}")
        httpx.get(f"{backend.url}/bulk-predict/{i}")
    assert series() - before <= 2  # "unmatched" 404s, and the template's 400 status at most
    text = httpx.get(f"{backend.url}/metrics").text
    assert 'route="/bulk-predict/{project}"' in text and "/no/such/path" not in text


def test_webhook_and_versions_answer_politely(backend: LiveServer, bundle: ModelBundle) -> None:
    answer = post(backend, "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert answer.status_code == 200
    assert httpx.get(f"{backend.url}/versions").json() == {"versions": [bundle.version]}
