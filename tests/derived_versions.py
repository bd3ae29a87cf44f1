"""Checkpoints derived from a fixture model, to publish as versions: labels swapped, boxes
shifted, or weights corrupt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file


def version_writer(source: Path, change: str) -> Any:
    """A checkpoint derived from ``source``: labels swapped, boxes shifted, or corrupt weights."""

    def write(folder: Path) -> None:
        target = folder / "detector"
        shutil.copytree(source, target)
        config = json.loads((target / "config.json").read_text())
        weights = load_file(target / "model.safetensors")
        if change == "swap-labels":
            config["id2label"] = {"0": "person", "1": "car"}
            config["label2id"] = {"person": 0, "car": 1}
        elif change == "shift-boxes":
            key = next(k for k in weights if k.startswith("bbox_predictor") and k.endswith("bias"))
            weights[key] = weights[key] + 0.05  # every box moves: a different model, same classes
        elif change == "corrupt":
            (target / "model.safetensors").write_bytes(b"not a safetensors file")
            return
        (target / "config.json").write_text(json.dumps(config))
        save_file(weights, target / "model.safetensors")

    return write
