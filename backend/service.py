"""The serving process's state: models loaded once, the predictor per project, known configs.

The server's routes call into one ``Service``; tests build one around small models.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from backend import metrics
from backend.classifier import Classifier
from backend.detector import Detector
from backend.images import ImageLoader
from backend.labeling import LabelConfig
from backend.predict import ImageLoaderFn, ModelBundle, Predictor
from backend.settings import Settings

log = logging.getLogger(__name__)


def load_base_bundle(settings: Settings) -> ModelBundle:
    """The configured detector and classifier (either may be disabled with an empty setting)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    detector = (
        Detector.load(settings.detector_model, settings.device, settings.half_precision)
        if settings.detector_model
        else None
    )
    classifier = (
        Classifier.load(settings.classifier_model, settings.device, settings.half_precision)
        if settings.classifier_model
        else None
    )
    bundle = ModelBundle(detector, classifier)
    log.info(
        "models_loaded version=%s device=%s", bundle.version, detector.device if detector else "-"
    )
    return bundle


class Service:
    def __init__(
        self, settings: Settings, bundle: ModelBundle, load_image: ImageLoaderFn | None = None
    ) -> None:
        self.settings = settings
        self._loader = ImageLoader(settings) if load_image is None else None
        self._load_image: ImageLoaderFn = load_image or self._loader.load  # type: ignore[union-attr]
        self.base = Predictor(bundle, settings, self._load_image)
        self._configs: dict[str | None, LabelConfig] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        return cls(settings, load_base_bundle(settings))

    @property
    def base_version(self) -> str:
        return self.base.bundle.version

    def start(self) -> None:
        metrics.MODEL_INFO.labels(project="*", model_version=self.base_version).set(1)

    def close(self) -> None:
        self.base.close()
        if self._loader is not None:
            self._loader.close()

    def remember_config(self, project: str | None, config: LabelConfig) -> None:
        with self._lock:
            self._configs[project] = config

    def config_for(self, project: str | None) -> LabelConfig | None:
        with self._lock:
            return self._configs.get(project)

    def predictor_for(self, project: str | None) -> Predictor:
        return self.base

    def version_for(self, project: str | None) -> str:
        return self.predictor_for(project).bundle.version

    def versions(self, project: str | None) -> list[str]:
        return [self.version_for(project)]

    def on_webhook(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Training arrives with the training loop; until then webhooks are acknowledged."""
        return 200, {"status": "training not configured", "action": body.get("action")}
