"""ONNX Runtime as the detector's CPU inference engine (``DETECTOR_ENGINE=onnxruntime``).

On a CPU, sliced inference is the model's forward passes and little else, so the way to be
faster than the model's own PyTorch forward is a runtime made for inference: ONNX Runtime
fuses the graph (convolution + batch norm + activation, attention) and ran a DETR-R50
window in about 0.55x PyTorch's time on the 2-core machine this was built on
(``bench/LOG.md``, "vs_sahi").

The graph is the transformers model traced once from ``pixel_values`` and ``pixel_mask``
(batch, height and width dynamic) to ``logits`` and ``pred_boxes``, so the checkpoint's
own ``post_process_object_detection`` decodes it exactly as it decodes PyTorch's outputs.
Where it comes from:

* a version published by the training job carries ``detector/model.onnx``, exported by
  the worker beside ``model.safetensors``, so a hot swap loads it ready;
* otherwise (a hub checkpoint, a version from before) it is exported at load, in memory.

A graph is used only if its answers equal PyTorch's on probe inputs at two shapes within
``TOLERANCE``; a file made for other weights (its metadata names their digest), a graph
that fails to export or differs is logged and the detector stays on PyTorch. ONNX files
are protocol buffers: loading one runs no pickle.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
REVISION_KEY = "ls_sahi_weights"  # metadata: checkpoint_revision() of the weights exported
OPSET = 17  # LayerNormalization and GridSample (Deformable DETR) are native from 16/17
# Largest difference allowed between the engine's and PyTorch's outputs on the probes:
# class probabilities and normalised box coordinates (1e-3 of an 800 px side is under a
# pixel). Float32 graph rewrites move them by about 1e-6.
TOLERANCE = 1e-3


class _Outputs(torch.nn.Module):
    """The model as a graph of tensors: (pixel_values, pixel_mask) -> (logits, pred_boxes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes


def _probes(height: int, width: int) -> list[dict[str, torch.Tensor]]:
    """Inputs at the model's input size and at another aspect ratio (whole images)."""
    gen = torch.Generator().manual_seed(0)
    probes = []
    for h, w in ((height, width), (height, width + width // 2)):
        pixels = torch.randn(1, 3, h, w, generator=gen)
        probes.append({"pixel_values": pixels, "pixel_mask": torch.ones(1, h, w, dtype=torch.long)})
    return probes


def export_onnx(model: torch.nn.Module, height: int, width: int, revision: str) -> bytes:
    """The model's ONNX graph, traced at ``height`` x ``width`` with dynamic axes."""
    import onnx

    example = _probes(height, width)[0]
    buffer = io.BytesIO()
    # The tracer warns of every Python branch on a tensor; the probes are what tell.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Outputs(model).eval(),
            (example["pixel_values"], example["pixel_mask"]),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object
            input_names=["pixel_values", "pixel_mask"],
            output_names=["logits", "pred_boxes"],
            dynamic_axes={
                "pixel_values": {0: "batch", 2: "height", 3: "width"},
                "pixel_mask": {0: "batch", 1: "height", 2: "width"},
            },
            opset_version=OPSET,
            dynamo=False,  # the TorchScript tracer: dynamic image sides, no onnxscript
        )
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(graph, {REVISION_KEY: revision})
    return bytes(graph.SerializeToString())


def onnx_revision(data: bytes) -> str | None:
    """The weights digest a graph was exported from (None: not one of ours)."""
    import onnx

    graph = onnx.load_from_string(data)
    return next((p.value for p in graph.metadata_props if p.key == REVISION_KEY), None)


@dataclass
class OnnxRunner:
    """An ONNX Runtime session that answers like the transformers model it came from."""

    session: Any
    origin: str  # "file" (published beside the weights) or "export" (made at load)
    # The graph's inputs, read once: a family that ignores the mask (RT-DETR) has no
    # pixel_mask input once traced.
    inputs: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.inputs = frozenset(i.name for i in self.session.get_inputs())

    @classmethod
    def from_bytes(cls, data: bytes, origin: str, threads: int | None = None) -> OnnxRunner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # torch's thread count unless told: the two engines then share the cores alike.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return cls(session, origin)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> SimpleNamespace:
        pixels = inputs["pixel_values"]
        mask = inputs.get("pixel_mask")
        if mask is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long)
        feed = {"pixel_values": pixels.float().numpy(), "pixel_mask": mask.to(torch.long).numpy()}
        logits, boxes = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})
        return SimpleNamespace(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))


def max_difference(model: torch.nn.Module, runner: OnnxRunner, height: int, width: int) -> float:
    """Largest gap between the runner's and the model's probabilities and boxes on the probes."""
    worst = 0.0
    for probe in _probes(height, width):
        with torch.inference_mode():
            ref = model(**probe)
        got = runner(probe)
        for a, b in (
            (got.logits.softmax(-1), ref.logits.float().softmax(-1)),
            (got.pred_boxes, ref.pred_boxes.float()),
        ):
            worst = max(worst, float((a - b).abs().max()))
    return worst


def load_runner(
    model: torch.nn.Module,
    folder: Path | None,
    revision: str,
    height: int,
    width: int,
    threads: int | None = None,
) -> OnnxRunner | None:
    """An engine for ``model``: the published graph when it matches, else a fresh export;
    None (stay on PyTorch, with the reason logged) when neither answers like the model."""
    data, origin = None, "export"
    path = folder / ONNX_FILE if folder is not None else None
    if path is not None and path.is_file():
        try:
            candidate = path.read_bytes()
            if onnx_revision(candidate) == revision:
                data, origin = candidate, "file"
            else:
                log.warning("engine_file_stale path=%s re-exporting", path)
        except Exception as exc:  # a truncated or foreign file: export afresh
            log.warning("engine_file_unreadable path=%s error=%s", path, type(exc).__name__)
    try:
        if data is None:
            data = export_onnx(model, height, width, revision)
        runner = OnnxRunner.from_bytes(data, origin, threads)
        gap = max_difference(model, runner, height, width)
    except Exception as exc:  # an op the exporter or runtime lacks: PyTorch still works
        log.warning(
            "engine_unavailable engine=onnxruntime using=torch error=%s: %s",
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        return None
    if gap > TOLERANCE:
        log.warning(
            "engine_mismatch engine=onnxruntime max_difference=%.2g tolerance=%g using=torch",
            gap,
            TOLERANCE,
        )
        return None
    log.info("engine_ready engine=onnxruntime origin=%s max_difference=%.2g", origin, gap)
    return runner


def write_onnx(
    model: torch.nn.Module, folder: Path, revision: str, height: int, width: int
) -> bool:
    """Export beside a saved checkpoint (the worker, at publish), if the graph answers like
    the model; written under a temporary name and renamed, so a reader never sees half a
    file. False (nothing written): serving processes will stay on PyTorch."""
    data = export_onnx(model, height, width, revision)
    gap = max_difference(model, OnnxRunner.from_bytes(data, "export"), height, width)
    if gap > TOLERANCE:
        log.warning("engine_export_skipped max_difference=%.2g tolerance=%g", gap, TOLERANCE)
        return False
    tmp = folder / f".{ONNX_FILE}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / ONNX_FILE)
    return True
