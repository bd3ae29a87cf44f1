"""Freshness across machines: from a project's last label to its new version served by
every replica, and how much of that is the training job.

    python -m bench.freshness [--rounds 3] [--replicas 2]

Three kinds of process, each with its own ``MODEL_DIR``, as on separate machines: one
``ls-sahi worker`` (the GPU box), ``--replicas`` ``ls-sahi serve`` processes, a shared
embedded Redis and a real S3-compatible store (SeaweedFS, ``testkit.object_store``). Each
round is a new project of 8 labelled scenes (the CPU benchmark's tiny Conditional DETR as
the base); its label webhooks go to the first replica, and the clock runs from the last
one until every replica answers ``/setup`` with the new version. Prints each round and the
medians of: last label to served, the job's own time, and live pointer to served.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from label_studio_sahi.jobs.redis_server import EmbeddedRedis, connect
from label_studio_sahi.labelstudio.label_config import parse_label_config, rectangle_result
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.registry import Registry
from testkit import FIXTURES
from testkit.fake_studio import FakeStudio
from testkit.object_store import SeaweedS3
from testkit.servers import settings_env
from testkit.tiny_models import draw_scene

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
<Label value="Vehicle" predicted_values="car"/><Label value="Person"/></RectangleLabels></View>"""
TASKS = 8
LABEL_OF = {"car": "Vehicle", "person": "Person"}  # the scenes' classes in CONFIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project(fake: FakeStudio, seed: int) -> tuple[int, list[int]]:
    rng = random.Random(seed)
    config = parse_label_config(CONFIG)
    pid = fake.add_project(CONFIG)
    tasks = []
    for i in range(TASKS):
        scene = draw_scene(384, 256, 6, rng)
        png = io.BytesIO()
        scene.image.save(png, "PNG")
        tid = fake.add_task(pid, {"image": fake.upload(pid, f"scene{i}.png", png.getvalue())})
        fake.add_annotation(tid, [
            rectangle_result(config.rectangles[0], box, LABEL_OF[label], 1.0, 384, 256)
            for box, label in zip(scene.boxes, scene.labels, strict=True)
        ])  # fmt: skip
        tasks.append(tid)
    return pid, tasks


def _start(command: list[str], settings: Settings, extra: dict[str, str], log: Path) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "label_studio_sahi.cli", *command],
        env={**settings_env(settings), **extra}, cwd=ROOT,
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _version(url: str, project: int) -> str:
    try:
        answer = httpx.post(f"{url}/setup", json={"project": str(project)}, timeout=30)
        return str(answer.json().get("model_version"))
    except httpx.HTTPError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ls-sahi-fresh-") as tmp, FakeStudio() as fake:
        work = Path(tmp)
        store = SeaweedS3(work / "seaweed").start()
        redis_server = EmbeddedRedis(work / "redis")
        url = redis_server.start()
        client = connect(url)
        aws = {k: v for k, v in store.env().items() if k != "MODEL_STORE"}

        def machine(name: str) -> Settings:
            return Settings(
                _env_file=None, host="127.0.0.1", model_dir=work / name, redis_url=url,
                model_store=store.url, device="cpu", torch_threads=1,
                label_studio_url=fake.url, label_studio_api_key=fake.legacy_token,
                detector_model=str(FIXTURES / "tiny-cond-detr"), classifier_model="",
                slice_height=128, slice_width=128, train_after_annotations=TASKS,
                train_debounce_seconds=0, promote_confidence=0.0, swap_poll_seconds=1,
            )  # fmt: skip

        worker = _start(["worker", "--name", "gpu"], machine("gpu"), aws, work / "worker.log")
        servers, processes = [], [worker]
        for i in range(args.replicas):
            port = _free_port()
            extra = {**aws, "PORT": str(port)}
            processes.append(_start(["serve"], machine(f"replica{i}"), extra, work / f"s{i}.log"))
            servers.append(f"http://127.0.0.1:{port}")
        try:
            for s in servers:
                while _version(s, 0) == "":
                    time.sleep(0.5)
            registry = Registry.for_settings(machine("bench"), client)
            for r in range(args.rounds):
                pid, tasks = _project(fake, seed=r)
                for tid in tasks:
                    event = {"action": "ANNOTATION_CREATED", "task": {"id": tid},
                             "project": {"id": pid, "label_config": CONFIG},
                             "annotation": {"id": tid, "result": []}}  # fmt: skip
                    httpx.post(f"{servers[0]}/webhook", json=event, timeout=30)
                last_label = time.perf_counter()
                while registry.live(str(pid)) is None:
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited; see {work / 'worker.log'}")
                    time.sleep(0.1)
                pointer = time.perf_counter()
                wanted = f"p{pid}-{registry.live(str(pid))}"
                while any(_version(s, pid) != wanted for s in servers):
                    time.sleep(0.1)
                served = time.perf_counter()
                row = {
                    "round": r,
                    "last_label_to_served_s": round(served - last_label, 2),
                    "last_label_to_pointer_s": round(pointer - last_label, 2),
                    "pointer_to_served_s": round(served - pointer, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                process.wait(timeout=120)
            redis_server.stop()
            store.stop()
    keys = ("last_label_to_served_s", "last_label_to_pointer_s", "pointer_to_served_s")
    medians = {k: statistics.median(row[k] for row in rows) for k in keys}
    print(
        f"median of {len(rows)} rounds, {args.replicas} replicas: last label to served "
        f"{medians[keys[0]]:.1f} s (the job {medians[keys[1]]:.1f} s), pointer to served by "
        f"every replica {medians[keys[2]]:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
