"""Hot swap under load: versions published and rolled back while /predict is busy.

No request may fail, and every answer must come whole from one model: its results equal
what that model version alone predicts for the image.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from derived_versions import version_writer
from labelled_project import CONFIG

from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle
from label_studio_sahi.versions.registry import Registry
from testkit.servers import LiveServer, make_settings, start_uvicorn, stop_uvicorn
from testkit.tiny_models import draw_scene

pytestmark = pytest.mark.slow


@pytest.fixture
def served(
    bundle: ModelBundle, redis_url: str, redis_client: Any, tmp_path: Path, detector_dir: Path
) -> Iterator[tuple[LiveServer, Service, Registry]]:
    settings = make_settings(
        model_dir=tmp_path / "models", redis_url=redis_url, swap_poll_seconds=0.5
    )
    image_path = tmp_path / "scene.png"
    draw_scene(384, 256, 6, random.Random(3)).image.save(image_path)
    from label_studio_sahi.images.fetch import load_local_image

    service = Service(
        settings,
        bundle,
        load_image=lambda url, _t: load_local_image(url, settings),
        redis_client=connect(redis_url),
    )
    live = start_uvicorn(create_app(settings, service))
    registry = Registry.for_settings(settings, redis_client)
    yield live, service, registry
    stop_uvicorn(live)


def _predict(url: str, image: str) -> dict[str, Any]:
    body = {
        "tasks": [{"id": 1, "data": {"image": image}}],
        "label_config": CONFIG,
        "project": "4.1700000000",
    }
    answer = httpx.post(f"{url}/predict", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["results"][0]


def _fingerprint(result: list[dict[str, Any]]) -> list[tuple[str, float, float, float]]:
    return sorted(
        (
            r["value"]["rectanglelabels"][0],
            round(r["value"]["x"], 3),
            round(r["value"]["y"], 3),
            round(r["score"], 4),
        )
        for r in result
    )


def test_versions_swap_under_load_without_a_failed_or_mixed_answer(
    served: tuple[LiveServer, Service, Registry], detector_dir: Path, tmp_path: Path
) -> None:
    live, service, registry = served
    image = str(tmp_path / "scene.png")
    v1 = registry.publish("4", version_writer(detector_dir, "swap-labels"), {"status": "accepted"})
    v2 = registry.publish("4", version_writer(detector_dir, "shift-boxes"), {"status": "accepted"})

    # What each model alone answers.
    expected = {service.base_version: _fingerprint(_predict(live.url, image)["result"])}
    for version in (v1, v2):
        registry.set_live("4", version.name)
        service.refresh("4")
        expected[version.model_version] = _fingerprint(_predict(live.url, image)["result"])
    assert len({json.dumps(v) for v in expected.values()}) == 3, (
        "the three models must answer differently"
    )
    registry.set_live("4", None)
    service.refresh("4")

    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answers.append(_predict(live.url, image))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for target in ["v1", "v2", "v1", None, "v2", "p4-v1", None]:
            registry.set_live("4", target)  # announced on pub/sub; the watcher swaps
            want = service.base_version if target is None else f"p4-{target.removeprefix('p4-')}"
            seen = len(answers)
            deadline = time.monotonic() + 60  # loading (and exporting the engine) takes a while
            while time.monotonic() < deadline and not any(
                a["model_version"] == want for a in answers[seen:]
            ):
                time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert not errors, errors[:3]
    assert len(answers) >= 20, len(answers)
    print(f"\n{len(answers)} answers during 7 swaps, none failed or mixed")
    served_versions = {a["model_version"] for a in answers}
    assert served_versions == set(expected), served_versions
    for answer in answers:
        assert _fingerprint(answer["result"]) == expected[answer["model_version"]]


def test_a_checkpoint_that_fails_to_load_is_refused_and_the_old_one_keeps_serving(
    served: tuple[LiveServer, Service, Registry], detector_dir: Path, tmp_path: Path
) -> None:
    live, service, registry = served
    good = registry.publish(
        "4", version_writer(detector_dir, "shift-boxes"), {"status": "accepted"}
    )
    registry.set_live("4", good.name)
    service.refresh("4")
    broken = registry.publish("4", version_writer(detector_dir, "corrupt"), {"status": "accepted"})
    registry.set_live("4", broken.name)
    service.refresh("4")
    assert service.version_for("4") == good.model_version
    answer = _predict(live.url, str(tmp_path / "scene.png"))
    assert answer["model_version"] == good.model_version and answer["result"]
    assert (
        httpx.post(f"{live.url}/setup", json={"project": "4"}).json()["model_version"]
        == good.model_version
    )


def test_a_fresh_server_whose_live_version_is_broken_serves_the_last_good_one(
    bundle: ModelBundle, redis_url: str, redis_client: Any, tmp_path: Path, detector_dir: Path
) -> None:
    settings = make_settings(model_dir=tmp_path / "models", redis_url=redis_url)
    registry = Registry.for_settings(settings, redis_client)
    good = registry.publish(
        "6", version_writer(detector_dir, "shift-boxes"), {"status": "accepted"}
    )
    rejected = registry.publish(
        "6", version_writer(detector_dir, "swap-labels"), {"status": "rejected"}
    )
    broken = registry.publish("6", version_writer(detector_dir, "corrupt"), {"status": "accepted"})
    registry.set_live("6", broken.name)

    service = Service(settings, bundle, redis_client=connect(redis_url))  # a process starting now
    service.refresh(None)

    assert service.version_for("6") == good.model_version  # not the base, not the rejected one
    service.refresh(None)  # the broken one is not retried on every poll
    assert service.version_for("6") == good.model_version
    assert broken.model_version in service.versions("6")
    assert rejected.model_version not in service.versions("6")  # never offered to serve
    service.close()
