"""Peak memory of merging the boxes of many windows: the box-to-box matches built in one
go (one block of all rows, as the merge did before) against blocks of
``MATCH_BLOCK_ROWS`` rows, on the same boxes.

    python -m bench.merge_memory [--boxes 2000 8000] [--pairs 3]

The boxes are random, 5-35 px, over a 2000 px square, 3 classes: a weak base sprays
about this many on a large image at small windows. The contenders run interleaved (A B A
B ...), each in a fresh process (an allocator keeps what it freed, so a second
measurement in one process would start above the first's peak), and the medians of ``--pairs`` rounds are printed with their
ratio. Both must give the same merged boxes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch

from bench.memory import PeakRSS
from label_studio_sahi.inference import slicing
from label_studio_sahi.inference.slicing import Detections, merge_detections


def boxes(n: int, seed: int = 0) -> Detections:
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 2000
    size = 5 + torch.rand(n, 2, generator=gen) * 30
    return Detections(
        torch.cat([xy, xy + size], dim=1),
        torch.rand(n, generator=gen),
        torch.randint(0, 3, (n,), generator=gen),
    )


def merged_peak(det: Detections, block_rows: int) -> tuple[float, int]:
    """MiB above the start while GREEDYNMM / IoS merges ``det``, and the boxes it keeps."""
    default = slicing.MATCH_BLOCK_ROWS
    slicing.MATCH_BLOCK_ROWS = block_rows
    try:
        with PeakRSS() as peak:
            kept = len(merge_detections(det, "GREEDYNMM", "IOS", 0.5))
    finally:
        slicing.MATCH_BLOCK_ROWS = default
    return peak.mib, kept


def measured(n: int, block_rows: int) -> tuple[float, int]:
    """``merged_peak`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.merge_memory", "--one", str(n), str(block_rows)],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return float(out[0]), int(out[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument(
        "--one", type=int, nargs=2, metavar=("BOXES", "ROWS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.one:
        mib, kept = merged_peak(boxes(args.one[0]), args.one[1])
        print(mib, kept)
        return 0
    for n in args.boxes:
        runs: dict[str, list[float]] = {"one block": [], "blocks": []}
        kept: dict[str, set[int]] = {"one block": set(), "blocks": set()}
        for _ in range(args.pairs):
            for name, rows in (("one block", n), ("blocks", slicing.MATCH_BLOCK_ROWS)):
                mib, count = measured(n, rows)
                runs[name].append(mib)
                kept[name].add(count)
        assert kept["one block"] == kept["blocks"], kept
        whole, blocked = (statistics.median(runs[k]) for k in ("one block", "blocks"))
        print(
            f"{n} boxes ({kept['blocks'].pop()} kept): one block {whole:.0f} MiB, blocks of "
            f"{slicing.MATCH_BLOCK_ROWS} rows {blocked:.0f} MiB (median of {args.pairs}), "
            f"ratio {whole / max(blocked, 1.0):.1f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
