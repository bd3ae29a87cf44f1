"""The real job (bench.quality.run_seed: FakeStudio, export, split, fine-tune, gate) on an
e2e-like project: the e2e template's labels (Vehicle = car or truck, Person), 1600x1200
scenes; optionally with one recipe patch.

    python -m bench.geometry_probe_job --seed 0 --window 512 [--patch relabelfirst]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench import geometry_probe as gp
from bench import quality as q
from label_studio_sahi.training import finetune
from testkit import scenes as data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--labels", type=int, default=12)
    p.add_argument("--test-images", type=int, default=6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--patch", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data.LABEL_CONFIG = gp.CONFIG
    data.LABEL_OF = dict(gp.LABEL_OF)
    data.LABELS = ("Vehicle", "Person")
    data.export_result = functools.partial(
        data.export_result, config=gp.CONFIG, label_of=gp.LABEL_OF
    )
    q.TAG = gp.TAG
    if args.patch == "relabelfirst":
        finetune._relabelled = (
            gp._relabelled_first
        )  # candidates imports relabel_head, which calls this
    make = lambda seed: gp.scene(seed)  # noqa: E731  (1600x1200, e2e grounds)
    split = q.test_split(args.test_images, make=make)
    over = {"slice_height": args.window, "slice_width": args.window,
            "train_steps": args.steps, "train_min_steps": args.steps}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gp-job-") as tmp:
        rows = q.run_seed(args.seed, [args.labels], split, gp.BASE, Path(tmp), over,
                          make=make, judge_candidate=True)  # fmt: skip
    for row in rows:
        keep = ("seed", "labels", "status", "windows", "steps", "heldout_candidate",
                "heldout_live", "map_50", "candidate_map_50", "accept", "candidate_accept", "why")  # fmt: skip
        print(json.dumps({"window": args.window, "patch": args.patch,
                          **{k: row.get(k) for k in keep}}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
