"""The GPU path's choices, pinned where a CPU can check them: torch.compile falls back to
eager instead of failing a request, and the processor run on the model's device is the
checkpoint's own processing (the same tensors)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from label_studio_sahi.inference.checkpoints import CompiledForward, process_images, takes_device
from label_studio_sahi.inference.detector import Detector


def failing_backend(graph: Any, example_inputs: Any) -> Any:
    raise RuntimeError("this compiler cannot take the graph")


def test_a_forward_the_compiler_cannot_take_runs_eager_with_the_same_outputs(
    detector: Detector, caplog: pytest.LogCaptureFixture
) -> None:
    model = detector.model
    pixels = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        want = model(pixel_values=pixels)
    compiled = CompiledForward(model, backend=failing_backend)

    with caplog.at_level(logging.WARNING), torch.inference_mode():
        got = compiled(pixel_values=pixels)
        again = compiled(pixel_values=pixels)

    assert compiled.compiled is None  # eager for good: not retried on every request
    assert caplog.text.count("compile_failed") == 1
    for out in (got, again):
        assert torch.equal(out.logits, want.logits)
        assert torch.equal(out.pred_boxes, want.pred_boxes)


def test_the_processor_on_a_device_is_the_checkpoints_own_processing(detector: Detector) -> None:
    assert takes_device(type(detector.processor))  # transformers' torchvision backend
    windows = [
        np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8) for i in range(3)
    ]
    plain = detector.processor(
        images=windows, return_tensors="pt", input_data_format="channels_last"
    )
    ours = process_images(detector.processor, windows, device=torch.device("cpu"))
    on_device = detector.processor(
        images=windows, return_tensors="pt", input_data_format="channels_last", device="cpu"
    )
    for key in ("pixel_values", "pixel_mask"):
        assert torch.equal(ours[key], plain[key])
        assert torch.equal(on_device[key], plain[key])


def test_a_large_image_shrunk_before_the_processor_gives_the_processors_own_pixels(
    detector: Detector,
) -> None:
    # The whole-image pass of a large image: resized on a view first (no full-size copies).
    big = np.random.default_rng(0).integers(0, 256, (2500, 4000, 3), dtype=np.uint8)
    assert detector._shrunk(big).shape[:2] == (128, 204)  # what the processor is given
    ours = detector.preprocess([big])
    plain = detector.processor(images=[big], return_tensors="pt", input_data_format="channels_last")
    assert ours["pixel_values"].shape == plain["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], plain["pixel_values"])
