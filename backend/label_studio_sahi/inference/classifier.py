"""Image classifiers (any ``AutoModelForImageClassification``: ViT, DeiT, timm) for Choices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModelForImageClassification

from label_studio_sahi.inference.checkpoints import PretrainedModel


class Classifier(PretrainedModel):
    AUTO_MODEL = AutoModelForImageClassification
    SETTING = "CLASSIFIER_MODEL"

    @property
    def multi_label(self) -> bool:
        """Trained with independent sigmoids (several classes may hold at once)."""
        return getattr(self.model.config, "problem_type", None) == "multi_label_classification"

    def probabilities(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``[len(images), num_classes]`` class probabilities (softmax, or sigmoid if multi-label)."""
        inputs = self.process(images)
        pixels = inputs["pixel_values"].to(self.device, dtype=self.dtype)
        with self._lock, torch.inference_mode():
            logits = self.model(pixel_values=pixels).logits.float()
        return (logits.sigmoid() if self.multi_label else logits.softmax(-1)).cpu()

    def classify(
        self, images: Sequence[np.ndarray], top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Top-k ``(class name, probability)`` per image, most likely first."""
        if not images:
            return []
        probs = self.probabilities(images)
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        names = self.id2label
        return [
            [(names[int(i)], float(v)) for v, i in zip(row_v, row_i, strict=True)]
            for row_v, row_i in zip(values, indices, strict=True)
        ]
