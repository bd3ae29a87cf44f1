"""Serving under load while versions change: no request may fail.

    python -m bench.load [--clients 8] [--seconds 60] [--swap-every 10]

A real server (uvicorn, one process) with the committed tiny models, an embedded Redis and
two published versions of project 4. ``--clients`` threads post /predict for project 4 (one
384x256 image each) as fast as they are answered, for ``--seconds``; meanwhile the live
version moves every ``--swap-every`` seconds (v1, v2, base, v2, v1 ...: publish-promotions
and rollbacks, announced on Redis, swapped by the server's watcher). Prints requests, failed
requests, latency percentiles and the versions that answered; writes ``load.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from label_studio_sahi.images.fetch import load_local_image
from label_studio_sahi.jobs.redis_server import EmbeddedRedis, connect
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.bundles import load_base_bundle
from label_studio_sahi.versions.registry import Registry
from testkit import FIXTURES
from testkit.servers import start_uvicorn, stop_uvicorn
from testkit.tiny_models import draw_scene

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image">
<Label value="Vehicle" predicted_values="car"/><Label value="Person"/></RectangleLabels>
<Choices name="scene" toName="image"><Choice value="Street"/><Choice value="Beach"/></Choices>
</View>"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--swap-every", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ls-sahi-load-") as tmp:
        work = Path(tmp)
        image = work / "scene.png"
        draw_scene(384, 256, 6, random.Random(3)).image.save(image)
        redis_server = EmbeddedRedis(work / "redis")
        url = redis_server.start()
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            host="127.0.0.1", model_dir=work / "models", redis_url=url, device="cpu",
            detector_model=str(FIXTURES / "tiny-cond-detr"), classifier_model=str(FIXTURES / "tiny-vit"),
            slice_height=128, slice_width=128, swap_poll_seconds=1.0, max_waiting_requests=64,
        )  # fmt: skip
        registry = Registry.for_settings(settings, connect(url))
        for _ in range(2):
            registry.publish(
                "4",
                lambda folder: shutil.copytree(FIXTURES / "tiny-cond-detr", folder / "detector"),
                {"status": "accepted"},
            )
        service = Service(
            settings, load_base_bundle(settings), lambda u, _t: load_local_image(u, settings),
            redis_client=connect(url),
        )  # fmt: skip
        live = start_uvicorn(create_app(settings, service))
        body = {"tasks": [{"id": 1, "data": {"image": str(image)}}], "label_config": CONFIG,
                "project": "4"}  # fmt: skip
        results: list[tuple[float, int, str]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    start = time.perf_counter()
                    try:
                        answer = http.post(f"{live.url}/predict", json=body)
                        status = answer.status_code
                        version = answer.json().get("model_version", "?")
                    except httpx.HTTPError as exc:
                        status, version = 0, type(exc).__name__
                    with lock:
                        results.append((time.perf_counter() - start, status, version))

        swaps: list[str | None] = []
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        cycle = ["v1", "v2", None, "v2", "v1", None]
        while time.monotonic() - started < args.seconds:
            time.sleep(min(args.swap_every, max(0.0, args.seconds - (time.monotonic() - started))))
            if time.monotonic() - started < args.seconds:
                target = cycle[len(swaps) % len(cycle)]
                registry.set_live("4", target)
                swaps.append(target)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        elapsed = time.monotonic() - started
        stop_uvicorn(live)
        service.close()
        redis_server.stop()

    latencies = [r[0] * 1000 for r in results]
    cuts = statistics.quantiles(latencies, n=100)  # cuts[k - 1]: the k-th percentile
    failed = [r for r in results if r[1] != 200]
    report: dict[str, Any] = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "swaps": [s or "base" for s in swaps],
        "requests": len(results),
        "failed": len(failed),
        "failures": sorted({f"{s} {v}" for _, s, v in failed}),
        "requests_per_s": round(len(results) / elapsed, 1),
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p95": round(cuts[94], 1),
            "p99": round(cuts[98], 1),
            "max": round(max(latencies), 1),
        },
        "answered_by": {
            v: sum(1 for r in results if r[2] == v) for v in sorted({r[2] for r in results})
        },
    }
    print(json.dumps(report, indent=2))
    (args.out / "load.json").write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
