"""Bulk-prediction throughput with 1 and 2 workers: do the chunks spread the work?

    python -m bench.bulk_throughput [--tasks 96] [--chunk 16] [--pairs 3]

A Label Studio stand-in (testkit.fake_studio) holds a project of ``--tasks`` 384x256 scenes,
an embedded Redis holds the queue, and ``ls-sahi worker`` processes (each with one torch
thread, the committed tiny detector) predict it. Each round starts its workers, waits until
they are registered (start-up is not timed), queues a run of every task (``--all``) and
times it from the request to the last chunk; rounds alternate 1, 2, 1, 2, ... workers so
that the machine's other load falls on both alike. Prints each round, the median tasks/s
per worker count, and the median of the per-pair ratios; writes ``bulk_throughput.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rq import Worker

from label_studio_sahi.jobs.bulk import enqueue_bulk, job_progress
from label_studio_sahi.jobs.redis_server import EmbeddedRedis, connect
from label_studio_sahi.settings import Settings
from testkit import FIXTURES
from testkit.fake_studio import FakeStudio
from testkit.servers import settings_env
from testkit.tiny_models import draw_scene

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
<Label value="Vehicle" predicted_values="car"/><Label value="Person"/></RectangleLabels></View>"""


def _start_workers(settings: Settings, count: int, folder: Path) -> list[subprocess.Popen[bytes]]:
    env = settings_env(settings)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "label_studio_sahi.cli", "worker", "--name", f"w{i}"],
            env=env,
            cwd=ROOT,
            stdout=(folder / f"w{i}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        for i in range(count)
    ]


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)  # rq's warm stop: it is idle, it leaves at once
    for worker in workers:
        worker.wait(timeout=60)


def _round(settings: Settings, client: Any, project: str, workers: int, folder: Path) -> float:
    """Seconds from the request to the run's end with ``workers`` worker processes."""
    started = _start_workers(settings, workers, folder)
    try:
        deadline = time.monotonic() + 180
        while len(Worker.all(connection=client)) < workers:
            if time.monotonic() > deadline or any(w.poll() is not None for w in started):
                raise RuntimeError(f"workers did not start; see {folder}")
            time.sleep(0.2)
        begin = time.perf_counter()
        enqueue_bulk(client, settings, project, only_missing=False)
        while (state := job_progress(client, project))["status"] not in ("finished", "failed"):
            time.sleep(0.2)
        seconds = time.perf_counter() - begin
        if state["status"] != "finished":
            raise RuntimeError(f"the run failed: {state.get('error')}")
        return seconds
    finally:
        _stop(started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=96)
    parser.add_argument("--chunk", type=int, default=16, help="BULK_CHUNK_TASKS")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of 1 and 2 workers")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bulk")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ls-sahi-bulk-") as tmp, FakeStudio() as fake:
        work = Path(tmp)
        pid = fake.add_project(CONFIG)
        for i in range(args.tasks):
            png = io.BytesIO()
            draw_scene(384, 256, 6, rng).image.save(png, "PNG")
            fake.add_task(pid, {"image": fake.upload(pid, f"scene{i}.png", png.getvalue())})
        redis_server = EmbeddedRedis(work / "redis")
        url = redis_server.start()
        client = connect(url)
        settings = Settings(
            _env_file=None,
            host="127.0.0.1", model_dir=work / "models", redis_url=url, device="cpu",
            label_studio_url=fake.url, label_studio_api_key=fake.legacy_token,
            detector_model=str(FIXTURES / "tiny-cond-detr"), classifier_model="",
            slice_height=128, slice_width=128, torch_threads=1, bulk_chunk_tasks=args.chunk,
            worker_maintenance_interval=5,
        )  # fmt: skip
        try:
            for pair in range(args.pairs):
                for workers in (1, 2):
                    seconds = _round(settings, client, str(pid), workers, work)
                    row = {
                        "pair": pair,
                        "workers": workers,
                        "seconds": round(seconds, 2),
                        "tasks_per_s": round(args.tasks / seconds, 3),
                    }
                    rounds.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            redis_server.stop()
    rate = {
        n: statistics.median(r["tasks_per_s"] for r in rounds if r["workers"] == n) for n in (1, 2)
    }
    ratios = [
        b["tasks_per_s"] / a["tasks_per_s"] for a, b in zip(rounds[::2], rounds[1::2], strict=True)
    ]
    report = {
        "tasks": args.tasks,
        "chunk": args.chunk,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "median_tasks_per_s": {"1 worker": round(rate[1], 3), "2 workers": round(rate[2], 3)},
        "ratio_2_over_1": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
    }
    (args.out / "bulk_throughput.json").write_text(json.dumps(report, indent=2))
    print(
        f"tasks/s (median of {args.pairs}): 1 worker {rate[1]:.2f}, 2 workers {rate[2]:.2f}; "
        f"2 / 1 = {report['ratio_2_over_1']:.2f}x (per pair: {report['ratios']})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
