"""``ls-sahi`` as users run it: predict, up (server + worker + embedded Redis), versions, rollback."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from stack import wait_for_health

from label_studio_sahi.cli import print_records
from label_studio_sahi.versions.registry import Registry
from testkit.tiny_models import draw_scene

ROOT = Path(__file__).resolve().parents[2]


def _env(**values: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO", "REDIS", "DETECTOR", "CLASSIFIER"))
    }
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **values)
    return env


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "label_studio_sahi.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_predict_prints_label_studio_results_for_local_images(
    detector_dir: Path, classifier_dir: Path, tmp_path: Path
) -> None:
    images = [tmp_path / "big.png", tmp_path / "other.png"]
    for seed, image in enumerate(images, start=1):
        draw_scene(512, 384, 6, random.Random(seed)).image.save(image)
    env = _env(DETECTOR_MODEL=str(detector_dir), CLASSIFIER_MODEL=str(classifier_dir), DEVICE="cpu")
    # stdout is a pipe here: JSON lines without --jsonl, one object per image, in order.
    run = _run("predict", *map(str, images), "--slice", "128", "--overlap", "0.2", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(image) for image in images]
    for record in records:
        types = {r["type"] for r in record["result"]}
        assert types == {"rectanglelabels", "choices"}
        labels = {
            r["value"]["rectanglelabels"][0]
            for r in record["result"]
            if r["type"] == "rectanglelabels"
        }
        assert labels <= {"car", "person"} and labels
        assert record["model_version"].startswith(detector_dir.name)


def test_predict_output_is_one_json_array_or_json_lines() -> None:
    records = [{"image": "a.png", "result": []}, {"image": "b.png", "result": [], "score": 0.5}]
    array = io.StringIO()
    print_records(records, array, lines=False)
    assert json.loads(array.getvalue()) == records
    lines = io.StringIO()
    print_records(records, lines, lines=True)
    assert [json.loads(line) for line in lines.getvalue().splitlines()] == records


def test_a_missing_image_fails_with_its_error_and_exit_code_1(
    detector_dir: Path, tmp_path: Path
) -> None:
    env = _env(DETECTOR_MODEL=str(detector_dir), CLASSIFIER_MODEL="", DEVICE="cpu")
    run = _run("predict", str(tmp_path / "nope.png"), "--jsonl", env=env)
    assert run.returncode == 1
    assert json.loads(run.stdout)["error"]["error"] in {"image_unreachable", "bad_image_url"}


def test_serve_and_worker_log_their_settings_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from label_studio_sahi.cli import _log_settings
    from label_studio_sahi.settings import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        label_studio_api_key="pat-secret-value",  # type: ignore[arg-type]
        basic_auth_user="ls",
        basic_auth_pass="pass-secret-value",  # type: ignore[arg-type]
        redis_url="redis://user:redis-secret@cache:6379/0",
        label_studio_url="http://admin:url-secret@studio:8080/ls",
    )
    with caplog.at_level("INFO", logger="label_studio_sahi.cli"):
        _log_settings(settings)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "secret" not in line
    assert 'redis_url="redis://**********@cache:6379/0"' in line
    assert 'label_studio_url="http://**********@studio:8080/ls"' in line
    assert 'basic_auth_user="ls"' in line and "slice_width=null" in line  # auto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_up_runs_server_worker_and_embedded_redis_and_stops_them_all(
    detector_dir: Path, tmp_path: Path
) -> None:
    port = _free_port()
    env = _env(DETECTOR_MODEL=str(detector_dir), CLASSIFIER_MODEL="", DEVICE="cpu", MODEL_DIR=str(tmp_path / "models"),
               HOST="127.0.0.1", PORT=str(port))  # fmt: skip
    up = subprocess.Popen([sys.executable, "-m", "label_studio_sahi.cli", "up"], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_health(
            f"http://127.0.0.1:{port}", up, lambda: up.stderr.read().decode() if up.stderr else ""
        )
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in children)
        assert "redis-server" in names and "label_studio_sahi.cli worker" in names
        assert (tmp_path / "models" / "redis" / "redis.sock").exists()
        answer = httpx.post(
            f"http://127.0.0.1:{port}/webhook",
            json={"action": "START_TRAINING", "project": {"id": 3}},
        )
        assert answer.status_code == 201 and answer.json()["job"] == "ls-sahi-train-3"
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
    time.sleep(1)
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
        "left processes behind"
    )


def test_versions_and_rollback(tmp_path: Path, redis_url: str, redis_client: Any) -> None:
    registry = Registry(tmp_path / "models" / "projects", redis_client)
    for _ in range(2):
        registry.publish(
            "5",
            lambda folder: (folder / "detector").mkdir(),
            {"status": "accepted", "metrics": {"candidate": {"map": 0.4}}},
        )
    registry.set_live("5", "v2")
    env = _env(REDIS_URL=redis_url, MODEL_DIR=str(tmp_path / "models"))

    listed = json.loads(_run("versions", "5", env=env).stdout)
    assert listed["live"] == "v2"
    assert [(v["version"], v["live"], v["map"]) for v in listed["versions"]] == [
        ("v1", False, 0.4),
        ("v2", True, 0.4),
    ]

    rolled = _run("rollback", "5", "v1", env=env)
    assert rolled.returncode == 0 and registry.live("5") == "v1"
    assert _run("rollback", "5", "base", env=env).returncode == 0 and registry.live("5") is None
    missing = _run("rollback", "5", "v9", env=env)
    assert missing.returncode == 2 and "no version 'v9'" in missing.stderr
