"""What the backend writes is its owner's alone, the generated login stays out of the log
stream, and a closed pipe ends the CLI without a traceback."""

from __future__ import annotations

import json
import logging
import random
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from processes import ROOT, free_port, start_cli, stopped
from stack import wait_for_health

from label_studio_sahi.jobs.redis_server import EmbeddedRedis
from label_studio_sahi.private_files import private_dir
from testkit.tiny_models import draw_scene


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_serve_keeps_model_dir_private_and_its_login_out_of_the_log(
    detector_dir: Path, tmp_path: Path
) -> None:
    model_dir, log, port = tmp_path / "new" / "models", tmp_path / "serve.log", free_port()
    # AUTH=basic: a login is generated; no terminal (a new session), stdout and stderr a file.
    serve = start_cli("serve", model_dir, detector_dir, log, PORT=str(port), AUTH="basic")
    try:
        wait_for_health(f"http://127.0.0.1:{port}", serve, log.read_text)
        login = json.loads((model_dir / "auth.json").read_text())
        written = log.read_text()
        assert login["password"] not in written
        assert f"basic_auth_login_generated user=label-studio file={model_dir / 'auth.json'}" in (
            written
        )

        assert _mode(model_dir) == 0o700 and _mode(model_dir.parent) == 0o700
        redis_files = [p for p in (model_dir / "redis").rglob("*") if p.is_file()]
        assert any(p.name.startswith("appendonly") for p in redis_files), redis_files
        for path in [model_dir, *model_dir.rglob("*")]:
            if path.is_dir():
                assert _mode(path) == 0o700, path
            elif path.is_file():
                assert _mode(path) == 0o600, path
    finally:
        serve.send_signal(signal.SIGTERM)
        stopped(serve, log)


def test_a_model_dir_others_can_read_is_named_in_a_warning_and_left_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="label_studio_sahi.private_files"):
        private_dir(shared)
    assert f"model_dir_not_private path={shared} mode=0755" in caplog.text
    assert _mode(shared) == 0o755  # the user's folder: changing it could break what shares it


def test_the_embedded_redis_tightens_files_an_earlier_version_left_readable(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "redis"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    old = folder / "appendonly.aof"
    old.write_text("")
    old.chmod(0o644)
    server = EmbeddedRedis(folder)
    server.start()
    try:
        assert _mode(folder) == 0o700 and _mode(old) == 0o600
    finally:
        server.stop()


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_the_cli_quietly(
    detector_dir: Path, tmp_path: Path
) -> None:
    images = [tmp_path / f"{name}.png" for name in "abc"]
    for seed, image in enumerate(images, start=1):
        draw_scene(256, 192, 3, random.Random(seed)).image.save(image)
    env = (
        f"DETECTOR_MODEL={detector_dir} CLASSIFIER_MODEL= DEVICE=cpu HF_HUB_OFFLINE=1 "
        f"MODEL_DIR={tmp_path / 'models'} "
    )
    cli = f"{env} {sys.executable} -m label_studio_sahi.cli"
    head = subprocess.run(
        ["bash", "-c", f"{cli} predict {' '.join(map(str, images))} | head -1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr, head.stderr
    assert json.loads(head.stdout)["image"] == str(images[0])

    # `true` reads nothing and exits at once: versions' one write meets a closed pipe. The
    # exit status is a shell's for a process SIGPIPE ended (`yes | true`): 141.
    gone = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{cli} versions 1 | true"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in gone.stderr, gone.stderr
    assert gone.returncode == 141
