"""The CLI as the separate processes users start: start one, wait for it to end cleanly,
a free port, the embedded redis-servers a MODEL_DIR has."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def start_cli(
    command: str, model_dir: Path, detector: Path, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "LABEL_STUDIO"))}
    env.update(
        HOST="127.0.0.1", MODEL_DIR=str(model_dir), DETECTOR_MODEL=str(detector),
        CLASSIFIER_MODEL="", DEVICE="cpu", TORCH_THREADS="1", HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "tests"), **extra,
    )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", *command.split()],
        env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # no terminal, as under Docker; the signal goes to it alone
    )  # fmt: skip


def stopped(process: subprocess.Popen[bytes], log: Path) -> None:
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"did not exit:\n{log.read_text()[-3000:]}") from None
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_servers_of(folder: Path) -> list[psutil.Process]:
    # redis-server retitles itself ("redis-server unixsocket:<path>"): match the path.
    socket = str(folder / "redis.sock")
    return [
        p for p in psutil.process_iter(["name", "cmdline"])
        if "redis" in (p.info["name"] or "") and socket in " ".join(p.info["cmdline"] or [])
    ]  # fmt: skip
