"""Windows one by one or in batches, upscaled or native, on this device: time and peak
memory of sliced_detect.

    python -m bench.window_batch [--batches 1 8] [--pairs 3] [--width 3000 --height 2000]
    python -m bench.window_batch --batches 1 1n     # upscaled to 800 vs native 512 px

DETR-R50 (random weights: the cost is the same as trained ones) with its hub processor
(512 px windows upscaled to 800), the same image and windows for every contender. The
contenders run interleaved (A B A B ...: this machine's speed drifts by up to 50 % from
minute to minute) and the medians of ``--pairs`` rounds are compared. Peak memory is the
largest resident set sampled every 50 ms during a pass, above the level before it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_predict import build_detr_r50
from bench.memory import PeakRSS
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.inference.sliced import SliceConfig, Timings, sliced_detect
from testkit.tiny_models import draw_scene


def timed_pass(detector: Detector, pixels: np.ndarray, slicing: SliceConfig) -> tuple[float, float]:
    """(seconds, peak MiB above the start) of one sliced_detect."""
    with PeakRSS(every=0.05) as peak:
        start = time.perf_counter()
        sliced_detect(detector, pixels, slicing, 0.5, Timings())
        seconds = time.perf_counter() - start
    return seconds, peak.mib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batches",
        nargs="+",
        default=["1", "8"],
        help="window batch sizes; a trailing n (1n) feeds the windows at their native size",
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--width", type=int, default=3000)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--slice", type=int, default=512)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        detector = Detector.load(str(build_detr_r50(Path(tmp) / "detr")), device="cpu")
    pixels = np.array(draw_scene(args.width, args.height, 30, random.Random(0)).image)
    results: dict[str, list[tuple[float, float]]] = {b: [] for b in args.batches}
    print(f"torch threads {torch.get_num_threads()}, device {detector.device}", flush=True)
    for round_ in range(args.pairs):
        for batch in args.batches:
            slicing = SliceConfig(
                slice_height=args.slice, slice_width=args.slice,
                window_batch_size=int(batch.rstrip("n")), native_windows=batch.endswith("n"),
            )  # fmt: skip
            seconds, peak = timed_pass(detector, pixels, slicing)
            results[batch].append((seconds, peak))
            print(
                f"round {round_ + 1} batch {batch}: {seconds:.1f} s, peak +{peak:.0f} MiB",
                flush=True,
            )
    first = args.batches[0]
    print(
        f"\n| window batch | median s | median peak MiB | time / batch {first}, median of rounds |"
    )
    print("|---|---|---|---|")
    for batch, runs in results.items():
        ratios = [s / b for (s, _), (b, _) in zip(runs, results[first], strict=True)]
        median = statistics.median(s for s, _ in runs)
        peak = statistics.median(p for _, p in runs)
        print(f"| {batch} | {median:.1f} | {peak:.0f} | {statistics.median(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
