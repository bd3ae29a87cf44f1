"""Time and peak memory of one ``/predict`` from 1 to 100 megapixels.

    python -m bench.sizes                          # tiny detector: the pipeline's own cost
    python -m bench.sizes --model r50 --sizes 1 4 16     # DETR-R50 (slow on a CPU)

Each image size is served by a fresh backend process (so one size's memory cannot hide
in another's), over real HTTP, the image a JPEG fetched from a local HTTP server as a
Label Studio upload, with the defaults (512 px windows, 20 % overlap, whole-image pass).
Peak memory is the server process's largest resident set during the request, sampled
every 20 ms, above its level after loading and a warm-up request. The sizes run
interleaved round by round; the table gives medians, and seconds per window (time linear
in the windows keeps that flat).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from testkit import FIXTURES

FIXTURE = FIXTURES / "tiny-cond-detr"
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="car"/><Label value="person"/></RectangleLabels></View>'
)


def make_image(path: Path, megapixels: float) -> tuple[int, int]:
    """A 4:3 JPEG of about ``megapixels``, tiled from one 1000 px scene (cheap to draw)."""
    from testkit.tiny_models import draw_scene

    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(width * 3 / 4)
    tile = np.asarray(draw_scene(1000, 1000, 60, random.Random(0)).image)
    reps = (-(-height // 1000), -(-width // 1000), 1)
    Image.fromarray(np.tile(tile, reps)[:height, :width]).save(path, quality=90)
    return width, height


def serve_one(model: str, device: str, image_dir: Path, name: str) -> dict[str, float]:
    """(in the child) Serve, warm up, then time one /predict of ``name`` and sample memory."""
    import httpx

    from bench.bench_predict import build_detr_r50, serve_folder
    from bench.memory import PeakRSS
    from label_studio_sahi.serving.routes import create_app
    from label_studio_sahi.serving.state import Service
    from label_studio_sahi.settings import Settings
    from label_studio_sahi.versions.bundles import load_base_bundle
    from testkit.servers import start_uvicorn, stop_uvicorn

    folder = str(FIXTURE) if model == "tiny" else str(build_detr_r50(image_dir.parent / "r50"))
    httpd, ls_url = serve_folder(image_dir)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        detector_model=folder,
        classifier_model="",
        device=device,
        auth="off",
        label_studio_url=ls_url,
    )
    live = start_uvicorn(create_app(settings, Service(settings, load_base_bundle(settings))))

    def predict(image: str) -> float:
        body = {
            "tasks": [{"id": 1, "data": {"image": f"/data/upload/{image}"}}],
            "label_config": CONFIG,
        }
        start = time.perf_counter()
        answer = httpx.post(f"{live.url}/predict", json=body, timeout=3600)
        answer.raise_for_status()
        assert "error" not in answer.json()["results"][0], answer.json()
        return time.perf_counter() - start

    try:
        predict("warmup.jpg")
        with PeakRSS() as peak:
            seconds = predict(name)
    finally:
        stop_uvicorn(live)
        httpd.shutdown()
    return {"seconds": seconds, "peak_mib": peak.mib, "base_mib": peak.base / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "r50"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(serve_one(args.model, args.device, Path(args.child[0]), args.child[1])))
        return 0

    from label_studio_sahi.inference.slicing import slice_windows

    work = Path(tempfile.mkdtemp(prefix="ls-sahi-sizes-"))
    images = work / "images"
    images.mkdir()
    make_image(images / "warmup.jpg", 0.3)
    shapes = {}
    for mp in args.sizes:
        shapes[mp] = make_image(images / f"{mp:g}mp.jpg", mp)
        print(f"{mp:g} MP: {shapes[mp][0]}x{shapes[mp][1]}, "
              f"{(images / f'{mp:g}mp.jpg').stat().st_size / 2**20:.1f} MiB JPEG", flush=True)  # fmt: skip
    runs: dict[float, list[dict[str, float]]] = {mp: [] for mp in args.sizes}
    for round_ in range(args.rounds):
        for mp in args.sizes:
            child = [
                sys.executable,
                "-m",
                "bench.sizes",
                "--model",
                args.model,
                "--device",
                args.device,
            ]
            out = subprocess.run(
                [*child, "--child", str(images), f"{mp:g}mp.jpg"],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[mp].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {mp:g} MP: {runs[mp][-1]}", flush=True)

    print(f"\nmodel {args.model}; medians of {args.rounds} rounds\n")
    print("| MP | pixels | windows | /predict s | s per window | peak above idle MiB |")
    print("|---|---|---|---|---|---|")
    for mp in args.sizes:
        width, height = shapes[mp]
        windows = len(slice_windows(height, width, 512, 512, 0.2, 0.2)) + 1  # + whole image
        seconds = statistics.median(r["seconds"] for r in runs[mp])
        peak = statistics.median(r["peak_mib"] for r in runs[mp])
        print(f"| {mp:g} | {width}x{height} | {windows} | {seconds:.1f} | "
              f"{seconds / windows:.3f} | {peak:.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
