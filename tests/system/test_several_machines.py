"""Three machines, as three processes with three MODEL_DIRs, one Redis and one object store
(a real SeaweedFS): a worker's job publishes a version, and two serving processes both
serve it from their own verified copy; a corrupt object, the store going away and a
worker killed mid-upload each leave every machine serving a whole version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from labelled_project import CONFIG, labelled_project
from processes import free_port
from rq.job import Job, JobStatus
from stack import (
    ROOT,
    job_done,
    settings_env,
    stack_settings,
    start_worker,
    wait_for,
    wait_for_health,
)

from label_studio_sahi import names
from label_studio_sahi.names import train_job_id
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.object_store import BUCKET, SeaweedS3
from testkit.tiny_models import random_detr

pytestmark = pytest.mark.slow


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    model_dir: Path

    def model_version(self, project: str) -> str:
        answer = httpx.post(f"{self.url}/setup", json={"project": project}, timeout=30)
        return str(answer.json()["model_version"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(settings: Settings, folder: Path, name: str) -> Server:
    port = free_port()
    log = folder / f"{name}.log"
    env = {**settings_env(settings), "HOST": "127.0.0.1", "PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", "serve"],
        env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, log, settings.model_dir)
    wait_for_health(server.url, process, log.read_text)
    return server


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path / "seaweed").start()
    for key, value in server.env().items():
        if key != "MODEL_STORE":  # a setting: each machine's own Settings carry it
            monkeypatch.setenv(key, value)  # what every process started here inherits
    yield server
    server.stop()


def _machine(
    fake: FakeStudio, redis_url: str, detector: Path, folder: Path, s3: SeaweedS3
) -> Settings:
    return stack_settings(fake, redis_url, detector, folder, model_store=s3.url)


def _manifest(s3: SeaweedS3, project: str, name: str) -> dict[str, Any]:
    key = f"ls-sahi/{names.PROJECTS_DIR}/{project}/{name}/{names.MANIFEST_FILE}"
    return json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())  # type: ignore[no-any-return]


def _holds_verified(model_dir: Path, project: str, name: str, manifest: dict[str, Any]) -> bool:
    folder = names.projects_root(model_dir) / project / name
    for path, entry in manifest["files"].items():
        local = folder / path
        if not local.is_file() or hashlib.sha256(local.read_bytes()).hexdigest() != entry["sha256"]:
            return False
    return True


def _copy_detector(version_dir: Path) -> Callable[[Path], None]:
    """A write for ``Registry.publish``: another version with the same detector."""

    def write(folder: Path) -> None:
        shutil.copytree(version_dir / names.DETECTOR_DIR, folder / names.DETECTOR_DIR)

    return write


def _event(project: int, task: int) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": project, "label_config": CONFIG},
        "task": {"id": task},
        "annotation": {"id": task, "result": []},
    }


def test_a_version_published_by_one_machine_is_served_by_two_others_from_their_own_copy(
    fake: FakeStudio, redis_url: str, redis_client: Any, s3: SeaweedS3, tmp_path: Path
) -> None:
    untrained = random_detr(tmp_path / "untrained", seed=1)
    machines = {
        n: _machine(fake, redis_url, untrained, tmp_path / n, s3) for n in ("gpu", "a", "b")
    }
    worker = start_worker(machines["gpu"], tmp_path, "gpu-worker")
    servers = [start_server(machines[n], tmp_path, f"server-{n}") for n in ("a", "b")]
    try:
        project = labelled_project(fake, n_tasks=8)
        pid = str(project.id)
        for task in project.task_ids:
            answer = httpx.post(
                f"{servers[0].url}/webhook", json=_event(project.id, task), timeout=30
            )
            assert answer.status_code in (200, 201)
        job = Job.fetch(train_job_id(pid), connection=redis_client)
        wait_for(lambda: job_done(job, [worker]), 600, "the training job on the worker")
        assert job.get_status(refresh=True) == JobStatus.FINISHED, worker.log.read_text()[-3000:]
        assert job.return_value()["status"] == "accepted"

        # The pointer moved after the manifest was stored: time from there to both serving.
        registry = Registry.for_settings(machines["gpu"], redis_client)
        assert registry.live(pid) == "v1"
        moved = time.monotonic()
        wanted = f"p{pid}-v1"
        wait_for(
            lambda: all(s.model_version(pid) == wanted for s in servers), 60, "both servers on v1"
        )
        print(f"\nlive pointer to v1 served by both replicas: {time.monotonic() - moved:.2f} s")
        manifest = _manifest(s3, pid, "v1")
        assert {"detector/model.safetensors", "meta.json"} <= set(manifest["files"])
        for server in servers:
            assert _holds_verified(server.model_dir, pid, "v1", manifest), server.log.read_text()
            image = fake.tasks[project.task_ids[0]]["data"]["image"]
            body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG,
                    "project": f"{pid}.1700000000"}  # fmt: skip
            answer = httpx.post(f"{server.url}/predict", json=body, timeout=60).json()
            assert answer["results"][0]["model_version"] == wanted

        # An object altered in the store: both keep v1, and take v2 once it is whole again.
        v1_dir = names.projects_root(tmp_path / "gpu") / pid / "v1"
        v2 = registry.publish(
            pid,
            _copy_detector(v1_dir),
            {**json.loads((v1_dir / names.META_FILE).read_text()), "run_id": "copy"},
        )
        key = f"ls-sahi/{names.PROJECTS_DIR}/{pid}/{v2.name}/detector/model.safetensors"
        good = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        s3.client().put_object(Bucket=BUCKET, Key=key, Body=good[:-8] + b"\0" * 8)
        registry.set_live(pid, v2.name)
        wait_for(
            lambda: all("version_fetch_failed" in s.log.read_text() for s in servers),
            60, "both servers refusing the corrupt copy",
        )  # fmt: skip
        assert all(s.model_version(pid) == wanted for s in servers)
        assert not any((names.projects_root(s.model_dir) / pid / v2.name).exists() for s in servers)
        s3.client().put_object(Bucket=BUCKET, Key=key, Body=good)
        wanted = f"p{pid}-{v2.name}"
        wait_for(lambda: all(s.model_version(pid) == wanted for s in servers), 90, "the retried v2")

        # The store stopped: /predict goes on from the cache, /health says degraded; a
        # version published after it returns is picked up.
        s3.stop()
        for server in servers:
            health = httpx.get(f"{server.url}/health", timeout=30).json()
            assert health["status"] == "UP" and "store" in health["degraded"], health
            assert server.model_version(pid) == wanted
        s3.start()
        v3 = registry.publish(
            pid,
            _copy_detector(v1_dir),
            {**json.loads((v1_dir / names.META_FILE).read_text()), "run_id": "after"},
        )
        registry.set_live(pid, v3.name)
        wanted = f"p{pid}-{v3.name}"
        wait_for(lambda: all(s.model_version(pid) == wanted for s in servers), 60, "v3 after")
        assert all("degraded" not in httpx.get(f"{s.url}/health").json() for s in servers)
    finally:
        for server in servers:
            server.stop()
        worker.stop()
    for server in servers:
        assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


UPLOAD = """
import sys
from pathlib import Path
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.registry import Registry

def write(folder: Path) -> None:
    (folder / "detector").mkdir()
    for i in range(40):  # 40 files of 4 MiB: an upload that takes a while
        (folder / "detector" / f"part-{i:02d}.bin").write_bytes(bytes([i]) * (4 << 20))

Registry.for_settings(Settings()).publish("9", write, {"status": "accepted"})
print("published", flush=True)
"""


def test_a_worker_killed_mid_upload_leaves_no_version_and_the_next_run_publishes_cleanly(
    s3: SeaweedS3, tmp_path: Path
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields},
        "MODEL_DIR": str(tmp_path / "gpu"), "MODEL_STORE": s3.url,
        "DETECTOR_MODEL": "", "CLASSIFIER_MODEL": "",
    }  # fmt: skip
    uploader = subprocess.Popen([sys.executable, "-c", UPLOAD], env=env, cwd=ROOT)
    prefix = f"ls-sahi/{names.PROJECTS_DIR}/9/"

    def uploaded() -> int:
        found = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return len(found)

    wait_for(lambda: uploaded() >= 3, 120, "part of the upload", every=0.05)
    uploader.send_signal(signal.SIGKILL)
    uploader.wait(timeout=10)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert not any(k.endswith(names.MANIFEST_FILE) for k in keys), "killed before the manifest"

    store = Settings(_env_file=None, model_store=s3.url, model_dir=tmp_path / "server")  # type: ignore[call-arg]
    assert Registry.for_settings(store).versions("9") == [], "no version, for anybody"
    assert not (names.projects_root(tmp_path / "gpu") / "9" / "v1").exists()

    again = subprocess.run([sys.executable, "-c", UPLOAD], env=env, cwd=ROOT, timeout=300,
                           capture_output=True, text=True)  # fmt: skip
    assert "published" in again.stdout, again.stderr[-3000:]
    server = Registry.for_settings(store)
    assert [v.name for v in server.versions("9")] == ["v1"]
    local = server.local(server.get("9", "v1"))
    assert len(list((local.path / "detector").iterdir())) == 40
