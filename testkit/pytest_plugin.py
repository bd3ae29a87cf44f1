"""Fixtures the tests and the benchmarks' tests share: clean settings, the cached models."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from label_studio_sahi.settings import Settings
from testkit import FIXTURES, tiny_models
from testkit.scenes import train_source_base


@pytest.fixture(autouse=True)
def no_env_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test, never from the developer's shell or a hub."""
    for name in list(os.environ):
        if name.upper() in Settings.model_fields or name.lower() in Settings.model_fields:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cached_model(cache: pytest.Cache, name: str, build: Callable[[Path], Path]) -> Path:
    """The committed checkpoint ``tests/fixtures/models/<name>`` (seeded, built by
    ``python -m testkit.tiny_models``), so every machine tests the same model whatever its
    speed; without it, build once per version of tiny_models.py into pytest's cache."""
    if (FIXTURES / name / "config.json").is_file():
        return FIXTURES / name
    source = Path(tiny_models.__file__).read_bytes()
    key = f"{name}-{hashlib.sha256(source).hexdigest()[:12]}"
    folder = cache.mkdir(key)
    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        shutil.rmtree(folder)
        tmp.rename(folder)
    return folder


@pytest.fixture(scope="session")
def source_base_dir(request: pytest.FixtureRequest) -> Path:
    """The learning benchmark's base: a tiny Conditional DETR trained on the source domain
    (testkit/scenes.py) that already detects something in the target project."""
    return cached_model(request.config.cache, "source-base", train_source_base)
