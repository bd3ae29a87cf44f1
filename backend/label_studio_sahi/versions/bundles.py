"""Which models serve a project: the base models from settings, or a fine-tuned version.

Used by the serving process, the training job, bulk predictions and ``ls-sahi predict``;
it imports no serving machinery (watcher, trigger, thread pools).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from label_studio_sahi import names
from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.registry import Registry, Version, VersionNotFound


@dataclass(frozen=True)
class ModelBundle:
    """The models serving one project, and the version Label Studio sees for them."""

    detector: Detector | None
    classifier: Classifier | None
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            parts = [m.version for m in (self.detector, self.classifier) if m is not None]
            object.__setattr__(self, "version", "+".join(parts) or "no-model")


log = logging.getLogger(__name__)


def load_base_bundle(settings: Settings) -> ModelBundle:
    """The configured detector and classifier (either may be disabled with an empty setting)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    detector = (
        _load_detector(settings.detector_model, settings) if settings.detector_model else None
    )
    classifier = _load_classifier(settings.classifier_model, settings)
    bundle = ModelBundle(detector, classifier)
    log.info(
        "models_loaded version=%s device=%s", bundle.version, detector.device if detector else "-"
    )
    return bundle


def _load_detector(source: str, settings: Settings) -> Detector:
    return Detector.load(
        source,
        settings.device,
        settings.half_precision,
        engine=settings.detector_engine,
        threads=settings.torch_threads,
        compile=settings.torch_compile,
    )


def _load_classifier(source: str, settings: Settings) -> Classifier | None:
    return (
        Classifier.load(source, settings.device, settings.half_precision, settings.torch_compile)
        if source
        else None
    )


def load_version_bundle(
    version: Version, base_classifier: Callable[[], Classifier | None], settings: Settings
) -> ModelBundle:
    """A fine-tuned version's models: its classifier, or (only then loaded) the base one."""
    detector = _load_detector(str(version.path / names.DETECTOR_DIR), settings)
    own = version.path / names.CLASSIFIER_DIR
    classifier = _load_classifier(str(own), settings) if own.is_dir() else base_classifier()
    return ModelBundle(detector, classifier, version=version.model_version)


def live_version(registry: Registry, project: str) -> Version | None:
    """The project's live version, on this machine's disk, or None for the base models: also
    when the live pointer names a version the registry does not hold (deleted, or another
    volume), so that serving and training agree on what is live. With ``MODEL_STORE``, a
    version the store cannot give (down, corrupt) raises: a job must not quietly run on
    the base models instead."""
    live = registry.live(project)
    if not live:
        return None
    try:
        version = registry.get(project, live)
    except VersionNotFound:
        log.warning("live_version_missing project=%s version=%s using=base", project, live)
        return None
    return registry.local(version)


def version_bundle(settings: Settings, version: Version | None) -> ModelBundle:
    """``version``'s models, or the base models for None.

    A version's bundle never loads the base detector it replaces.
    """
    if version is not None:
        return load_version_bundle(
            version, lambda: _load_classifier(settings.classifier_model, settings), settings
        )
    return load_base_bundle(settings)


def project_bundle(settings: Settings, registry: Registry, project: str) -> ModelBundle:
    """The models a project is served with now: its live version, or the base models."""
    return version_bundle(settings, live_version(registry, project))


def check_bundle(bundle: ModelBundle) -> None:
    """Run each model once on a blank image: catches broken checkpoints and warms them up."""
    blank = np.full((64, 64, 3), 127, dtype=np.uint8)
    if bundle.detector is not None:
        if not bundle.detector.id2label:
            raise ValueError("detector has no classes")
        bundle.detector.detect([blank], threshold=0.5)
    if bundle.classifier is not None:
        bundle.classifier.classify([blank], top_k=1)
