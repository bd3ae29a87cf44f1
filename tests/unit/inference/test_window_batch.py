"""How many windows go through the model at once: WINDOW_BATCH_SIZE, or by device."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from label_studio_sahi.inference.detector import Detector, fit_batch
from label_studio_sahi.inference.sliced import SliceConfig, Timings, sliced_detect


def _batches(
    detector: Detector, slicing: SliceConfig, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    sizes: list[int] = []
    forward = detector.forward

    def counting(inputs: dict[str, torch.Tensor]) -> Any:
        sizes.append(int(inputs["pixel_values"].shape[0]))
        return forward(inputs)

    monkeypatch.setattr(detector, "forward", counting)
    image = np.zeros((256, 384, 3), dtype=np.uint8)
    sliced_detect(detector, image, slicing, 0.5, Timings())
    return sizes


def test_auto_sends_windows_one_by_one_on_cpu_and_as_many_as_memory_holds_on_cuda(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert detector.window_batch() == 1
    # On CUDA: half the free memory over one window's forward, 1 to 32 windows.
    assert fit_batch(free_bytes=8 * 2**30, per_window_bytes=256 * 2**20) == 16
    assert fit_batch(free_bytes=80 * 2**30, per_window_bytes=256 * 2**20) == 32
    assert fit_batch(free_bytes=100 * 2**20, per_window_bytes=256 * 2**20) == 1
    sizes = _batches(detector, SliceConfig(slice_height=128, slice_width=128), monkeypatch)
    assert len(sizes) > 3 and set(sizes) == {1}  # windows, then the whole image


def test_a_set_batch_size_is_kept(detector: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    slicing = SliceConfig(slice_height=128, slice_width=128, window_batch_size=3)
    sizes = _batches(detector, slicing, monkeypatch)
    assert sizes[0] == 3 and max(sizes) == 3


def _input_sizes(
    detector: Detector, slicing: SliceConfig, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    forward = detector.forward

    def recording(inputs: dict[str, torch.Tensor]) -> Any:
        sizes.append(tuple(inputs["pixel_values"].shape[-2:]))  # type: ignore[arg-type]
        return forward(inputs)

    monkeypatch.setattr(detector, "forward", recording)
    sliced_detect(detector, np.zeros((256, 384, 3), dtype=np.uint8), slicing, 0.5, Timings())
    monkeypatch.undo()
    return sizes


def test_native_windows_keep_their_size_and_the_whole_image_still_uses_the_processors(
    detector: Detector, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fixture's processor resizes to a 128 px shortest edge; these windows are 96 px.
    upscaled = _input_sizes(detector, SliceConfig(slice_height=96, slice_width=96), monkeypatch)
    native = _input_sizes(
        detector, SliceConfig(slice_height=96, slice_width=96, native_windows=True), monkeypatch
    )
    assert set(upscaled[:-1]) == {(128, 128)} and set(native[:-1]) == {(96, 96)}
    assert native[-1] == upscaled[-1] == (128, 192)  # the full-image pass: processor's size
