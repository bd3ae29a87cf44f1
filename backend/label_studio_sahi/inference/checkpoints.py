"""Loading transformers checkpoints from a hub id or a local folder, with errors users can act on."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from label_studio_sahi.errors import ModelLoadError

log = logging.getLogger(__name__)

HUB_UNREACHABLE_HINT = (
    "the Hugging Face hub could not be reached and the model is not in the local cache; "
    "point {setting} at a local folder saved with save_pretrained (config.json, "
    "model.safetensors, preprocessor_config.json)"
)


def resolve_device(setting: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else is passed to torch."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir()


def load_pretrained(
    auto_model: Any, auto_processor: Any, source: str, setting: str
) -> tuple[Any, Any]:
    """Load ``(model, processor)`` with ``from_pretrained``; safetensors weights only.

    Args:
        auto_model: e.g. ``AutoModelForObjectDetection``.
        auto_processor: e.g. ``AutoImageProcessor``.
        source: hub id or local folder.
        setting: the environment variable that chose ``source``, for the error message.

    Raises:
        ModelLoadError: the folder is missing or incomplete, or the hub is unreachable.
    """
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{setting}={source}: no config.json in that folder")
        source = str(folder)
    try:
        # use_safetensors: a pickled checkpoint (pytorch_model.bin) is refused, never unpickled.
        model = auto_model.from_pretrained(source, use_safetensors=True)
        processor = auto_processor.from_pretrained(source)
    except OSError as exc:
        text = str(exc)
        offline = any(
            hint in text
            for hint in (
                "couldn't connect",
                "offline",
                "Connection",
                "resolve",
                "not cached",
                "LocalEntryNotFound",
            )
        )
        reason = HUB_UNREACHABLE_HINT.format(setting=setting) if offline else text.splitlines()[0]
        raise ModelLoadError(f"cannot load {setting}={source}: {reason}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"cannot load {setting}={source}: {str(exc).splitlines()[0]}") from exc
    return model, processor


def checkpoint_revision(source: str, model: Any) -> str:
    """A short id of the weights in use: the hub commit, or a digest of local weight files."""
    commit = getattr(model.config, "_commit_hash", None)
    folder = Path(source).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for path in [*sorted(folder.glob("*.safetensors")), folder / "config.json"]:
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()[:8]
    return (commit or "unknown")[:8]


def short_name(source: str) -> str:
    """``facebook/detr-resnet-50`` -> ``detr-resnet-50``; a folder -> its name."""
    return Path(source.rstrip("/")).name or source


def half_dtype(device: torch.device, half_precision: bool) -> torch.dtype:
    """float16 on CUDA when asked (it halves memory and doubles speed there), else float32."""
    return torch.float16 if half_precision and device.type == "cuda" else torch.float32


@functools.cache
def _takes_data_format(preprocess: Callable[..., Any]) -> bool:
    """Whether a processor class's ``preprocess`` takes ``input_data_format`` (once per
    class, not per batch: this is on the serving path)."""
    parameters = inspect.signature(preprocess).parameters.values()
    return any(
        p.name == "input_data_format" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def takes_device(processor_class: Any) -> bool:
    """Whether a processor runs on a torch device (transformers' torchvision backend)."""
    kwargs = getattr(processor_class, "valid_kwargs", None)
    return "device" in getattr(kwargs, "__annotations__", {})


def process_images(
    processor: Any,
    images: Sequence[Any],
    size: dict[str, int] | None = None,
    device: torch.device | None = None,
) -> Any:
    """``processor``'s batch of ``images`` (HWC arrays or PIL images) as torch tensors.

    The channel axis is named where the processor takes it: a 1x1 or 3x3 array is
    otherwise guessed channels-first. (timm's processors take no such argument.)

    On CUDA a torchvision-backed processor is given the device: the uint8 windows go up
    (a quarter of the bytes of float32, and fewer pixels than after upscaling) and are
    resized and normalised there, in batches, by the checkpoint's own code."""
    takes = _takes_data_format(type(processor).preprocess)
    extra: dict[str, Any] = {"input_data_format": "channels_last"} if takes else {}
    if size is not None:
        extra["size"] = size
    if device is not None and device.type == "cuda" and takes_device(type(processor)):
        extra["device"] = str(device)
    return processor(images=list(images), return_tensors="pt", **extra)


class CompiledForward:
    """``torch.compile`` of a model's forward that falls back to eager for good at the
    first failure (a family or shape the compiler cannot take), with the reason logged."""

    def __init__(self, model: Any, **options: Any) -> None:
        self.eager = model.forward
        self.compiled: Callable[..., Any] | None = torch.compile(model.forward, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                log.warning("compile_failed using=eager error=%s", type(exc).__name__)
                self.compiled = None
        return self.eager(*args, **kwargs)


@dataclass
class PretrainedModel:
    """A transformers model with its processor, on its device, named by its version.

    Subclasses set ``AUTO_MODEL`` and ``SETTING`` (the env var that names the checkpoint).
    One forward at a time per model (``_lock``): concurrent forwards on a CPU only fight
    over the same cores, and on a GPU they multiply peak memory.
    """

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    version: str

    AUTO_MODEL: ClassVar[Any] = None
    SETTING: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.model.eval().to(self.device, dtype=self.dtype)
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls, source: str, device: str = "auto", half_precision: bool = True, compile: bool = False
    ) -> Self:
        """Load from a hub id or folder (see ``load_pretrained`` for the errors).

        ``compile``: ``torch.compile`` the forward on CUDA (shapes marked dynamic: windows
        and whole images differ), eager again if it fails."""
        from transformers import AutoImageProcessor

        model, processor = load_pretrained(cls.AUTO_MODEL, AutoImageProcessor, source, cls.SETTING)
        dev = resolve_device(device)
        version = f"{short_name(source)}@{checkpoint_revision(source, model)}"
        loaded = cls(model, processor, dev, half_dtype(dev, half_precision), version)
        if compile and dev.type == "cuda":
            loaded.model.forward = CompiledForward(loaded.model, dynamic=True)
        return loaded

    def process(self, images: Sequence[Any], size: dict[str, int] | None = None) -> Any:
        return process_images(self.processor, images, size=size, device=self.device)

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in self.model.config.id2label.items()}
