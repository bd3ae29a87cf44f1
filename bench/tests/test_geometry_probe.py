"""The geometry probe (bench/LOG.md, "Geometry") still runs the job's own fine-tuning and
scoring on its e2e-like project: two steps, one test image, both models scored."""

from __future__ import annotations

import json

import pytest

from bench import geometry_probe


@pytest.mark.slow
def test_the_probe_scores_base_and_candidate_and_logs_the_loss_parts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--seeds", "0", "--steps", "2", "--test-images", "1", "--window", "512"]
    assert geometry_probe.main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["train_tasks"], row["held_tasks"], row["steps"]) == (9, 3, 2)
    assert row["windows"] > 0
    for scored in ("base_held", "cand_held", "base_test", "cand_test"):
        assert 0 <= row[scored]["map_50"] <= 1 and row[scored]["n_gt"] > 0
    # The GIoU part is what the 512 px collapse shows (above 1: no overlap).
    assert set(row["parts_first_last"]) >= {"loss_ce", "loss_bbox", "loss_giou"}
