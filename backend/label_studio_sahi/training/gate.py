"""The promotion gate: does a candidate beat the live model on the held-out tasks, surely?

``judge`` turns both models' held-out boxes into the evidence (mAP gain and how often it
holds over bootstrap draws of the images; on a tie, the annotator's corrections, by
bootstrap and sign test); ``decide`` reads it, per model, with ``PROMOTE_CONFIDENCE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.settings import Settings
from label_studio_sahi.training.evaluate import (
    HeldOutScore,
    bootstrap_fewer,
    corrections,
    paired_bootstrap,
    sign_test_fewer,
)

GATE_METRIC = "map_50"  # what promotion compares: a box found at IoU 0.5 is one not drawn


@dataclass
class Candidates:
    """What fine-tuning produced, with its scores and the live models' on the same tasks."""

    detector: Detector | None = None
    classifier: Classifier | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)


def judge(
    candidate: HeldOutScore,
    live: HeldOutScore,
    threshold: float,
    num_labels: int,
    settings: Settings,
) -> dict[str, Any]:
    """What ``decide`` weighs, from both models' held-out boxes: each side's metrics with
    its corrections at the serving ``threshold``, how surely the candidate's mAP gain holds
    over bootstrap draws of the images, and on a tie how surely it leaves fewer corrections
    (bootstrap and sign test)."""
    fixes = {
        side: corrections(scored.predictions, scored.truths, threshold)
        for side, scored in (("candidate", candidate), ("live", live))
    }
    out: dict[str, Any] = {
        "candidate": {**candidate.metrics, "corrections": sum(fixes["candidate"])},
        "live": {**live.metrics, "corrections": sum(fixes["live"])},
    }
    gain = candidate.metrics[GATE_METRIC] - live.metrics[GATE_METRIC]
    resample = settings.promote_confidence > 0
    # Re-drawing the held-out images only matters for a gain the gate would weigh.
    out["bootstrap_better"] = (
        paired_bootstrap(
            candidate.predictions, live.predictions, candidate.truths, num_labels,
            candidate.sizes, metric=GATE_METRIC,
        )
        if gain > 0 and resample
        else float(gain > 0)
    )  # fmt: skip
    if gain == 0:  # a tie on mAP: the gate weighs the annotator's corrections (decide)
        out["bootstrap_fewer_corrections"] = (
            bootstrap_fewer(fixes["candidate"], fixes["live"])
            if resample
            else float(sum(fixes["candidate"]) < sum(fixes["live"]))
        )
        out["sign_fewer_corrections"] = (
            sign_test_fewer(fixes["candidate"], fixes["live"]) if resample else 1.0
        )
    return out


def decide(candidates: Candidates, settings: Settings) -> dict[str, dict[str, Any]]:
    """Per model, whether to promote it and why; detector and classifier independently.

    The detector must score higher than live on held-out mAP@.5 *and* do so on at least
    ``PROMOTE_CONFIDENCE`` of the paired bootstrap draws of the held-out images (a few
    images are noise). On a tie (most often both 0: a few sparse held-out images where
    neither model finds the objects), it must instead leave the annotator fewer corrections
    at the serving threshold, in as many bootstrap draws and by a sign test over the images
    (a tie on 2 held-out images never promotes: chance makes one model lower on both once in
    four): mAP does not see a live model that sprays false boxes, an annotator deletes every
    one. The classifier must have a higher held-out accuracy.
    """
    m = candidates.metrics
    out: dict[str, dict[str, Any]] = {}
    if candidates.detector is not None:
        gain = m["candidate"][GATE_METRIC] - m["live"][GATE_METRIC]
        needs = f"(needs {settings.promote_confidence:.0%})"
        images = m["candidate"]["images"]
        held = (
            f"held-out {GATE_METRIC} {m['candidate'][GATE_METRIC]:.4f} vs live "
            f"{m['live'][GATE_METRIC]:.4f} ({gain:+.4f})"
        )
        if gain == 0 and "bootstrap_fewer_corrections" in m:
            fewer, signs = m["bootstrap_fewer_corrections"], m["sign_fewer_corrections"]
            promoted = fewer > 0 and min(fewer, signs) >= settings.promote_confidence
            why = (
                f"{held}, a tie; corrections at the serving threshold "
                f"{m['candidate']['corrections']} vs live {m['live']['corrections']}, fewer in "
                f"{fewer:.0%} of bootstrap draws of {images} images and {signs:.0%} by a sign "
                f"test over them {needs}"
            )
        else:
            sure = m["bootstrap_better"]
            promoted = gain > 0 and sure >= settings.promote_confidence
            why = f"{held}; better in {sure:.0%} of bootstrap draws of {images} images {needs}"
        out["detector"] = {"promoted": promoted, "why": why}
    if candidates.classifier is not None:
        a, b = m["candidate_accuracy"], m["live_accuracy"]
        out["classifier"] = {
            "promoted": a > b,
            "why": f"held-out accuracy {a:.3f} vs live {b:.3f}",
        }
    return out
