"""End-to-end ``/predict`` against sahi at its best batch size, per engine, on this device.

    python -m bench.vs_sahi                      # 3000x2000, 512 px windows, 3 rounds
    python -m bench.vs_sahi --pairs 5 --width 2000 --height 1500

One process, one DETR-R50 (random weights: the cost is the same as trained ones) with its
hub processor (windows upscaled to 800 px), one image, the same windows, full-image pass
and merge for every contender:

* ``sahi bN``: sahi 0.12.8 ``get_sliced_prediction(batch_size=N)`` on the image in memory,
  around the very model object; its best batch (lowest median) is the yardstick;
* ``/predict torch``: the backend with its defaults over real HTTP (uvicorn), the image
  fetched from a local HTTP server as a Label Studio upload: all a user waits for;
* ``/predict onnxruntime``: the same with ``DETECTOR_ENGINE=onnxruntime``;
* ``/predict native`` (and ``native+onnxruntime``): ``NATIVE_WINDOW_SIZE=true``.

The contenders run interleaved, one round after another (A B C ... A B C ...: this
machine's speed drifts by up to 50 % from minute to minute), each round in a rotated
order; every ratio is taken within a round and the median over rounds is reported.

Boxes: the engine's merged boxes are compared with PyTorch's on the same image at a low
threshold (random weights score low), outside the timed runs. Accuracy of native windows
is the learning benchmark's (``python -m bench.quality --native-table``), not this model's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.bench_predict import build_detr_r50, serve_folder, time_forward, time_predict
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig, sliced_detect
from label_studio_sahi.inference.slicing import slice_windows
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import LiveServer, start_uvicorn, stop_uvicorn
from testkit.tiny_models import draw_scene

# /predict contenders: (engine, native windows)
BACKENDS = {
    "/predict torch": ("torch", False),
    "/predict onnxruntime": ("onnxruntime", False),
    "/predict native": ("torch", True),
    "/predict native+onnxruntime": ("onnxruntime", True),
}


def engine_boxes_gap(
    torch_det: Detector, onnx_det: Detector, pixels: np.ndarray, slicing: SliceConfig
) -> str:
    """How far the engine's merged boxes are from PyTorch's (threshold 0.02)."""
    want = sliced_detect(torch_det, pixels, slicing, 0.02)
    got = sliced_detect(onnx_det, pixels, slicing, 0.02)
    if len(want) != len(got) or got.labels.tolist() != want.labels.tolist():
        return f"boxes differ in number or labels: {len(got)} vs {len(want)}"
    gap = float((got.boxes - want.boxes).abs().max()) if len(want) else 0.0
    score = float((got.scores - want.scores).abs().max()) if len(want) else 0.0
    return f"{len(want)} boxes, same labels, max corner gap {gap:.4f} px, max score gap {score:.2g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="rounds of every contender")
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--slice", type=int, default=512)
    parser.add_argument("--sahi-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu.sh)")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"

    work = Path(tempfile.mkdtemp(prefix="ls-sahi-vs-sahi-"))
    images = work / "images"
    images.mkdir()
    scene = draw_scene(args.width, args.height, 40, random.Random(0), min_side=20, max_side=60)
    scene.image.save(images / "big.jpg", quality=92)
    pixels = np.asarray(Image.open(images / "big.jpg").convert("RGB"))  # what /predict sees
    folder = build_detr_r50(work / "detr-r50")
    torch_det = Detector.load(str(folder), device=args.device, engine="torch")
    onnx_det = Detector.load(str(folder), device="cpu", engine="onnxruntime") if on_cpu else None
    assert onnx_det is None or onnx_det.engine == "onnxruntime", "no engine; see the log"
    base = Settings(
        _env_file=None,  # type: ignore[call-arg]
        slice_height=args.slice,
        slice_width=args.slice,
        device=args.device,
        auth="off",
        classifier_model="",
    )
    cfg = SliceConfig.from_settings(base)
    n_windows = len(slice_windows(args.height, args.width, args.slice, args.slice, 0.2, 0.2))
    print(
        f"image {args.width}x{args.height}, {n_windows} windows of {args.slice} px + the whole "
        f"image, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    print(f"device {torch_det.device}, window batch (auto) {torch_det.window_batch()}", flush=True)
    if onnx_det is not None:
        print("engine vs torch:", engine_boxes_gap(torch_det, onnx_det, pixels, cfg), flush=True)

    httpd, ls_url = serve_folder(images)
    servers: dict[str, LiveServer] = {}
    contenders: dict[str, Callable[[], float]] = {}
    try:
        for name, (engine, native) in BACKENDS.items():
            if name in args.skip or (engine == "onnxruntime" and onnx_det is None):
                continue
            settings = base.model_copy(
                update={"label_studio_url": ls_url, "native_window_size": native}
            )
            detector = onnx_det if engine == "onnxruntime" and onnx_det else torch_det
            service = Service(settings, ModelBundle(detector, None))
            servers[name] = live = start_uvicorn(create_app(settings, service))
            contenders[name] = lambda url=live.url: time_predict(url, ls_url)
            contenders[name]()  # warm-up: first-call allocations, lazy imports
        from testkit.sahi_reference import sahi_model, sahi_sliced_prediction

        # The floor: the model's forward alone on the windows /predict runs, batched as it
        # batches them, inputs made beforehand (on the device).
        auto = replace(cfg, window_batch_size=torch_det.window_batch())
        contenders["model forward only"] = lambda: time_forward(torch_det, pixels, auto)
        # sahi runs a transformers model as given and feeds it float32: on CUDA it gets its
        # own float32 copy (ours serves in float16), as sahi's users run it.
        sahi_det = (
            torch_det
            if on_cpu
            else Detector.load(str(folder), device=args.device, half_precision=False)
        )
        for batch in args.sahi_batches:
            model = sahi_model(sahi_det, base.score_threshold)

            def run_sahi(model: object = model, batch: int = batch) -> float:
                start = time.perf_counter()
                sahi_sliced_prediction(model, pixels, cfg, batch_size=batch)  # type: ignore[arg-type]
                return time.perf_counter() - start

            contenders[f"sahi b{batch}"] = run_sahi

        names = list(contenders)
        times: dict[str, list[float]] = {n: [] for n in names}
        for round_ in range(args.pairs):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(contenders[name]())
                print(f"round {round_ + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        for live in servers.values():
            stop_uvicorn(live)
        httpd.shutdown()

    sahi_names = [n for n in names if n.startswith("sahi")]
    best = min(sahi_names, key=lambda n: statistics.median(times[n]))
    print(f"\nsahi's best batch here: {best}\n")
    print(
        "| contender | "
        + " | ".join(f"round {i + 1}" for i in range(args.pairs))
        + f" | median s | / {best} (median of rounds) |"
    )
    print("|---|" + "---|" * args.pairs + "---|---|")
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times[best], strict=True)]
        rounds = " | ".join(f"{t:.1f}" for t in times[name])
        print(
            f"| {name} | {rounds} | {statistics.median(times[name]):.1f} | {statistics.median(ratios):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
