"""DETR-family object detectors (any ``AutoModelForObjectDetection``) behind one small contract.

``Detector.detect`` takes a list of images (whole images or slice windows, HWC uint8) and
returns one ``Detections`` per image, in that image's pixel coordinates. Post-processing is
the checkpoint's own image processor's (``post_process_object_detection``), so each family
(DETR softmax, Deformable / Conditional / RT-DETR sigmoid top-k) is decoded as its authors
decode it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from transformers import AutoModelForObjectDetection

from label_studio_sahi.inference.checkpoints import (
    PretrainedModel,
    checkpoint_revision,
    takes_device,
)
from label_studio_sahi.inference.onnx_engine import OnnxRunner, load_runner
from label_studio_sahi.inference.slicing import Detections, clip_boxes
from label_studio_sahi.settings import Engine

log = logging.getLogger(__name__)

# Images of more pixels than this are resized before the processor (Detector._shrunk).
SHRINK_FIRST_PIXELS = 8_000_000

# DETR processors resize to a shortest and a longest edge; past this aspect ratio a thin
# image's short side would shrink below one pixel (a 20000x8 strip). Such an image is padded
# at the bottom or right (pixel coordinates hold) up to it; boxes are clipped to the image.
MAX_INPUT_ASPECT = 16


def input_size(height: int, width: int) -> tuple[int, int]:
    """The ``(height, width)`` an image of this size is given to the model at."""
    return (
        max(height, math.ceil(width / MAX_INPUT_ASPECT)),
        max(width, math.ceil(height / MAX_INPUT_ASPECT)),
    )


def _padded(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    size = input_size(height, width)
    if size == (height, width):
        return image
    out = np.zeros((*size, *image.shape[2:]), dtype=image.dtype)
    out[:height, :width] = image
    return out


def _native_size(processor: Any, images: Sequence[np.ndarray]) -> dict[str, int] | None:
    """The processor's ``size`` that keeps these images as they are, or None (sizes differ,
    or a processor whose size has another form)."""
    shapes = {i.shape[:2] for i in images}
    if len(shapes) != 1:
        return None
    height, width = shapes.pop()
    current = getattr(processor, "size", None)
    if getattr(current, "shortest_edge", None) or (
        isinstance(current, dict) and "shortest_edge" in current
    ):
        return {"shortest_edge": min(height, width), "longest_edge": max(height, width)}
    if getattr(current, "height", None) or (isinstance(current, dict) and "height" in current):
        return {"height": height, "width": width}
    return None


# Windows per forward pass when WINDOW_BATCH_SIZE is auto. On a CPU a batch is no faster
# than its windows one by one, and costs memory and time: a DETR-R50 over 41 windows took
# about 30 % longer and 1 GB more at batch 8 than at 1 (bench/LOG.md, "window_batch"; 2-core CPU). On a
# GPU batches keep the device busy: as many as half the free memory holds, measured.
CPU_WINDOW_BATCH = 1
MAX_CUDA_WINDOW_BATCH = 32
CUDA_MEMORY_SHARE = 0.5  # of the free memory at the probe; the rest for other requests


def fit_batch(free_bytes: int, per_window_bytes: int) -> int:
    """Windows per batch that fit ``CUDA_MEMORY_SHARE`` of ``free_bytes``, 1 to the cap."""
    fits = int(free_bytes * CUDA_MEMORY_SHARE) // max(per_window_bytes, 1)
    return max(1, min(MAX_CUDA_WINDOW_BATCH, fits))


@dataclass
class Detector(PretrainedModel):
    AUTO_MODEL = AutoModelForObjectDetection
    SETTING = "DETECTOR_MODEL"

    # ONNX Runtime in place of the PyTorch forward (DETECTOR_ENGINE=onnxruntime, see
    # inference.onnx_engine); the PyTorch model stays loaded: training and the fallback use it.
    runner: OnnxRunner | None = None
    _cuda_batch: int | None = None

    @classmethod
    def load(
        cls,
        source: str,
        device: str = "auto",
        half_precision: bool = True,
        compile: bool = False,
        engine: Engine = "torch",
        threads: int | None = None,
    ) -> Self:
        detector = super().load(source, device, half_precision, compile)
        if engine == "onnxruntime" and detector.device.type != "cpu":
            log.warning("engine_skipped engine=onnxruntime device=%s using=torch", detector.device)
        elif engine != "torch" and detector.device.type == "cpu":
            detector.use_engine(source, threads)
        return detector

    def use_engine(self, source: str, threads: int | None = None) -> None:
        """Serve through ONNX Runtime when it answers like the model (else stay on PyTorch)."""
        folder = Path(source).expanduser()
        height, width = self.input_shape()
        self.runner = load_runner(
            self.model,
            folder if folder.is_dir() else None,
            checkpoint_revision(source, self.model),
            height,
            width,
            threads,
        )

    def input_shape(self) -> tuple[int, int]:
        """The ``(height, width)`` the processor gives the model for a square window."""
        pixels = self.process([np.zeros((64, 64, 3), dtype=np.uint8)])["pixel_values"]
        return int(pixels.shape[-2]), int(pixels.shape[-1])

    def window_batch(self) -> int:
        """WINDOW_BATCH_SIZE=auto: 1 on a CPU; on CUDA what ``fit_batch`` allows, from the
        memory one window's forward takes (probed once, at the window input size)."""
        if self.device.type != "cuda":
            return CPU_WINDOW_BATCH
        if self._cuda_batch is None:
            height, width = self.input_shape()
            probe = {
                "pixel_values": torch.zeros(
                    1, 3, height, width, device=self.device, dtype=self.dtype
                ),
                "pixel_mask": torch.ones(1, height, width, device=self.device, dtype=torch.long),
            }
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.forward(probe)
            per_window = torch.cuda.max_memory_allocated(self.device) - before
            free, _ = torch.cuda.mem_get_info(self.device)
            self._cuda_batch = fit_batch(free, per_window)
            log.info(
                "window_batch auto=%d per_window_mib=%.0f", self._cuda_batch, per_window / 2**20
            )
        return self._cuda_batch

    @property
    def engine(self) -> str:
        return "onnxruntime" if self.runner is not None else "torch"

    def preprocess(
        self, images: Sequence[np.ndarray], native: bool = False
    ) -> dict[str, torch.Tensor]:
        """The checkpoint's own resize and normalisation, batched, on the model's device.

        ``native``: images of one size keep it (the processor's normalisation, not its
        resize), e.g. 512 px windows not upscaled to 800."""
        padded = [_padded(i) for i in images]
        size = _native_size(self.processor, padded) if native else None
        if size is None:
            padded = [self._shrunk(i) for i in padded]
        inputs = self.process(padded, size=size)
        return {
            k: v.to(
                self.device,
                dtype=self.dtype if v.is_floating_point() else v.dtype,
                non_blocking=True,  # already there when the processor ran on the GPU
            )
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    def _shrunk(self, image: np.ndarray) -> np.ndarray:
        """A large image (the whole-image pass) resized by the processor's own ``resize``
        on a view of it, before the processor: the same pixels to the last bit (tested),
        without the full-size tensor copies the processor makes (about 500 MB at 100 MP)."""
        if (
            image.shape[0] * image.shape[1] <= SHRINK_FIRST_PIXELS
            or not getattr(self.processor, "do_resize", False)
            or not takes_device(type(self.processor))  # transformers' torchvision backend
        ):
            return image
        view = torch.from_numpy(image).permute(2, 0, 1)
        small = self.processor.resize(
            view, size=self.processor.size, resample=self.processor.resample
        )
        return small.permute(1, 2, 0).numpy()

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        with self._lock, torch.inference_mode():
            return self.runner(inputs) if self.runner is not None else self.model(**inputs)

    def postprocess(
        self, outputs: Any, sizes: Sequence[tuple[int, int]], threshold: float
    ) -> list[Detections]:
        """Model outputs -> per-image detections in pixels (``sizes`` are ``(height, width)``)."""
        # Decode in float32 whatever the model ran in: half-precision softmax loses small scores.
        for key in ("logits", "pred_boxes"):
            if getattr(outputs, key, None) is not None:
                setattr(outputs, key, getattr(outputs, key).float())
        decoded = self.processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=[input_size(h, w) for h, w in sizes]
        )
        margins = self.query_margins(outputs.logits).cpu()
        result = []
        for i, (item, (h, w)) in enumerate(zip(decoded, sizes, strict=True)):
            queries = _query_of(item["boxes"].float(), outputs.pred_boxes[i], input_size(h, w))
            boxes = clip_boxes(item["boxes"].float(), width=w, height=h)
            det = Detections(
                boxes.cpu(),
                item["scores"].float().cpu(),
                item["labels"].long().cpu(),
                margins[i][queries],
            )
            result.append(best_class_per_box(det))
        return result

    def query_margins(self, logits: torch.Tensor) -> torch.Tensor:
        """``[batch, queries]``: each query's best class probability minus its second best,
        with the family's own probabilities (DETR: softmax with a no-object class, the
        others: independent sigmoids)."""
        if logits.shape[-1] == len(self.id2label) + 1:
            probs = logits.softmax(-1)[..., :-1]
        else:
            probs = logits.sigmoid()
        if probs.shape[-1] < 2:
            return probs[..., 0]
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    def detect(self, images: Sequence[np.ndarray], threshold: float) -> list[Detections]:
        """Run one batched forward pass over ``images`` (HWC uint8 RGB arrays)."""
        if not images:
            return []
        outputs = self.forward(self.preprocess(images))
        return self.postprocess(
            outputs, [(img.shape[0], img.shape[1]) for img in images], threshold
        )


def _query_of(boxes: torch.Tensor, pred_boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Which query each decoded box came from: the query whose (cx, cy, w, h) box, scaled
    to ``size`` as the processor scales it, is nearest (the decoders return no indices)."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64)
    height, width = size
    cx, cy, bw, bh = pred_boxes.float().cpu().unbind(-1)
    corners = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
    corners = corners * torch.tensor([width, height, width, height], dtype=corners.dtype)
    return torch.cdist(boxes.cpu(), corners, p=1).argmin(dim=1)


def best_class_per_box(det: Detections) -> Detections:
    """One label per predicted box: the highest-scoring one.

    Sigmoid-decoded families (Conditional / Deformable DETR, RT-DETR) rank every
    (query, class) pair, so at low thresholds one query can come back as the same box
    twice with two labels. An annotator wants one box per object; exact coordinate
    equality identifies the query.
    """
    if len(det) <= 1:
        return det
    _, group = torch.unique(det.boxes, dim=0, return_inverse=True)
    if int(group.max()) + 1 == len(det):
        return det
    best: dict[int, int] = {}
    for i in torch.argsort(det.scores, descending=True, stable=True).tolist():
        best.setdefault(int(group[i]), i)
    return det.select(torch.tensor(sorted(best.values()), dtype=torch.int64))
