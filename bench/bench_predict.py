"""How much does serving add to the model? And how does it compare with sahi?

One run, one machine, the same DETR-R50 architecture (random weights: the cost is the
same as trained ones), the same 4000x3000 image and the same slice parameters, timed
three ways:

1. ``/predict`` over real HTTP (uvicorn), the image fetched from a local HTTP server as a
   Label Studio upload: everything a user waits for.
2. The model's own forward time on exactly the windows (and full-image pass) that
   ``/predict`` ran, preprocessed beforehand: the floor.
3. ``sahi.predict.get_sliced_prediction`` with sahi's transformers adapter around the same
   model and image processor.

Run from the repository root: ``bench`` is a package, and it borrows the tests' helpers as
``tests.*`` (uvicorn in a thread from ``testkit/servers.py``, the scenes from
``testkit/tiny_models.py``, sahi's call from ``testkit/sahi_reference.py``)::

    python -m bench.bench_predict                      # 4000x3000, 512 px windows, CPU
    python -m bench.bench_predict --width 2000 --height 1500 --repeats 2

Prints a table and the ratios; no result is asserted anywhere.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor

from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig
from label_studio_sahi.inference.slicing import slice_windows
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import start_uvicorn, stop_uvicorn
from testkit.tiny_models import draw_scene

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="car"/><Label value="person"/></RectangleLabels></View>'
)


def build_detr_r50(folder: Path) -> Path:
    """DETR-R50 (timm ResNet-50 backbone, 100 queries) with random weights, saved as a checkpoint."""
    torch.manual_seed(0)
    model = DetrForObjectDetection(DetrConfig())
    model.save_pretrained(folder)
    DetrImageProcessor().save_pretrained(folder)  # 800 px shortest edge, as the hub checkpoint
    return folder


def serve_folder(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.path = self.path.removeprefix("/data/upload")
            super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def time_predict(url: str, ls_url: str) -> float:
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/big.jpg"}}], "label_config": CONFIG}
    start = time.perf_counter()
    answer = httpx.post(f"{url}/predict", json=body, timeout=3600)
    elapsed = time.perf_counter() - start
    answer.raise_for_status()
    return elapsed


def time_forward(detector: Detector, pixels: np.ndarray, cfg: SliceConfig) -> float:
    """Model forward only, on the same windows and batches as the pipeline."""
    height, width = pixels.shape[:2]
    windows = slice_windows(
        height,
        width,
        cfg.slice_height,
        cfg.slice_width,
        cfg.overlap_height_ratio,
        cfg.overlap_width_ratio,
    ).tolist()
    crops = [pixels[y1:y2, x1:x2] for x1, y1, x2, y2 in windows]
    batches = [
        crops[i : i + cfg.window_batch_size] for i in range(0, len(crops), cfg.window_batch_size)
    ]
    if cfg.full_image_pass and len(windows) > 1:
        batches.append([pixels])
    inputs = [detector.preprocess(batch) for batch in batches]
    start = time.perf_counter()
    for item in inputs:
        detector.forward(item)
    return time.perf_counter() - start


def time_sahi(detector: Detector, pixels: np.ndarray, cfg: SliceConfig, threshold: float) -> float:
    from testkit.sahi_reference import (  # sahi only here (--skip-sahi)
        sahi_model,
        sahi_sliced_prediction,
    )

    model = sahi_model(detector, threshold)
    start = time.perf_counter()
    sahi_sliced_prediction(model, pixels, cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--slice", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--window-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--skip-sahi", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ls-sahi-bench-"))
    images = work / "images"
    images.mkdir()
    scene = draw_scene(args.width, args.height, 40, random.Random(0), min_side=20, max_side=60)
    scene.image.save(images / "big.jpg", quality=92)
    pixels = np.asarray(scene.image)

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        slice_height=args.slice,
        slice_width=args.slice,
        overlap_height_ratio=args.overlap,
        overlap_width_ratio=args.overlap,
        window_batch_size=args.window_batch,
        device="cpu",
    )
    cfg = SliceConfig.from_settings(settings)
    detector = Detector.load(str(build_detr_r50(work / "detr-r50")), device="cpu")
    httpd, ls_url = serve_folder(images)
    settings = settings.model_copy(update={"label_studio_url": ls_url})
    live = start_uvicorn(create_app(settings, Service(settings, ModelBundle(detector, None))))
    n_windows = len(
        slice_windows(args.height, args.width, args.slice, args.slice, args.overlap, args.overlap)
    )
    print(
        f"image {args.width}x{args.height}, {n_windows} windows of {args.slice} px + full image, "
        f"torch threads {torch.get_num_threads()}, window batch {args.window_batch}",
        flush=True,
    )

    rows: dict[str, list[float]] = {
        "predict (HTTP)": [],
        "model forward only": [],
        "sahi get_sliced_prediction": [],
    }
    try:
        time_predict(live.url, ls_url)  # warm-up: first-call allocations, lazy imports
        paths = {
            "predict (HTTP)": lambda: time_predict(live.url, ls_url),
            "model forward only": lambda: time_forward(detector, pixels, cfg),
            "sahi get_sliced_prediction": lambda: time_sahi(
                detector, pixels, cfg, settings.score_threshold
            ),
        }
        if args.skip_sahi:
            del paths["sahi get_sliced_prediction"]
        order = list(paths)
        for repeat in range(args.repeats):
            # Rotate the order each repeat: whichever runs first or last in a row of
            # minute-long CPU runs is measurably favoured on a shared machine.
            for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
                rows[name].append(paths[name]())
    finally:
        stop_uvicorn(live)
        httpd.shutdown()

    med = {name: statistics.median(v) for name, v in rows.items() if v}
    print(f"\n{'path':<30}{'median s':>10}{'runs':>6}")
    for name, value in med.items():
        print(f"{name:<30}{value:>10.2f}{len(rows[name]):>6}")
    predict, forward = med["predict (HTTP)"], med["model forward only"]
    print(
        f"\n/predict over model forward: {predict / forward:.3f}x "
        f"(overhead {100 * (predict - forward) / predict:.1f}% of the request)"
    )
    if "sahi get_sliced_prediction" in med:
        print(f"sahi over /predict: {med['sahi get_sliced_prediction'] / predict:.3f}x")


if __name__ == "__main__":
    main()
