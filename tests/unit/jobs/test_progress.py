"""Progress where people wait at a terminal: a bar on stderr when it is one, and plain JSON
on stdout either way (lines when piped), so output redirected to a file stays clean."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
from labelled_project import labelled_project
from stack import ROOT, settings_env, stack_settings, start_worker

from testkit.fake_studio import FakeStudio
from testkit.tiny_models import draw_scene, random_detr


def run_cli(args: list[str], env: dict[str, str], stderr_on_terminal: bool) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ls-sahi ARGS``, stdout a pipe, stderr a pseudo-
    terminal or a pipe."""
    command = [sys.executable, "-m", "label_studio_sahi.cli", *args]
    if not stderr_on_terminal:
        run = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        return run.returncode, run.stdout, run.stderr
    leader, follower = pty.openpty()
    # A terminal of 120 x 30 (a fresh pseudo-terminal has no size, and tqdm draws to its width).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=follower, text=True
    )
    os.close(follower)
    terminal = b""
    while True:  # drain the terminal while the command runs (it blocks when the pty is full)
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the command closed its end
                break
            if not chunk:
                break
            terminal += chunk
        elif process.poll() is not None:
            break
    out = process.stdout.read() if process.stdout else ""
    process.wait(timeout=60)
    os.close(leader)
    return process.returncode, out, terminal.decode(errors="replace")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        draw_scene(256, 192, 4, random.Random(i)).image.save(path)
    return paths


def predict_env(detector_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DETECTOR", "CLASSIFIER"))}
    env.update(
        HF_HUB_OFFLINE="1", DETECTOR_MODEL=str(detector_dir), CLASSIFIER_MODEL="", DEVICE="cpu"
    )
    return env


def test_predicting_many_images_draws_a_bar_on_a_terminal_and_keeps_stdout_json(
    detector_dir: Path, images: list[Path]
) -> None:
    code, out, terminal = run_cli(
        ["predict", *map(str, images), "--slice", "128"], predict_env(detector_dir), True
    )
    assert code == 0, terminal[-2000:]
    assert [json.loads(line)["image"] for line in out.splitlines()] == list(map(str, images))
    assert "images: 100%" in terminal and "3/3" in terminal  # tqdm's bar, on stderr


def test_piped_stderr_gets_no_bar(detector_dir: Path, images: list[Path]) -> None:
    code, out, err = run_cli(
        ["predict", *map(str, images), "--slice", "128"], predict_env(detector_dir), False
    )
    assert code == 0, err[-2000:]
    assert len(out.splitlines()) == 3
    assert "images:" not in err and "3/3" not in err  # (transformers' own loading bar may be)


def training_run(
    fake: FakeStudio, tmp_path: Path, redis_url: str, stderr_on_terminal: bool
) -> tuple[int, str, str]:
    project = labelled_project(fake, n_tasks=8)
    settings = stack_settings(
        fake, redis_url, random_detr(tmp_path / "base", seed=1), tmp_path / "models",
        train_steps=60, train_min_steps=60,
    )  # fmt: skip
    worker = start_worker(settings, tmp_path, "progress-worker")
    try:
        return run_cli(
            ["train", str(project.id), "--wait"], settings_env(settings), stderr_on_terminal
        )
    finally:
        worker.stop()


@pytest.mark.slow
def test_train_wait_follows_the_job_as_json_lines_when_piped(
    fake: FakeStudio, tmp_path: Path, redis_url: str
) -> None:
    code, out, err = training_run(fake, tmp_path, redis_url, stderr_on_terminal=False)
    assert code == 0, err[-2000:]
    states: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    stages = [s.get("stage") for s in states if s.get("stage")]
    assert "training detector" in stages and stages[-1] == "done", stages
    steps = [s["step"] for s in states if s.get("stage") == "training detector" and "step" in s]
    assert steps and all("loss" in s and "eta_seconds" in s for s in states if "step" in s)
    last = states[-1]
    assert last["status"] == "finished" and last["result"]["status"] in ("accepted", "rejected")


@pytest.mark.slow
def test_train_wait_draws_stage_step_loss_and_eta_on_a_terminal(
    fake: FakeStudio, tmp_path: Path, redis_url: str
) -> None:
    code, out, terminal = training_run(fake, tmp_path, redis_url, stderr_on_terminal=True)
    assert code == 0, terminal[-2000:]
    # The stage, step of steps, loss and ETA. Polled once a second, a 60-step training stage
    # can pass unseen on a loaded machine; the evaluation after it still shows its last step.
    assert "training detector" in terminal or "evaluating" in terminal, terminal
    assert "/60" in terminal and "loss=" in terminal and "eta=" in terminal, terminal
    lines = out.splitlines()  # stdout: the job id, then the outcome; no per-poll lines
    assert len(lines) == 2 and json.loads(lines[-1])["status"] == "finished"
