"""Helpers that tests import: settings for tests, a real uvicorn server in a thread."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from label_studio_sahi.serving.http_limits import uvicorn_config
from label_studio_sahi.settings import Settings

LEGACY_TOKEN = "a" * 20 + "0123456789abcdef0123"


@functools.cache
def _model_dirs() -> Path:
    """One folder per test process for every model_dir it hands out, removed at exit: a
    test run leaves nothing behind in the system's temporary folder."""
    base = Path(tempfile.mkdtemp(prefix="ls-sahi-models-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return base


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: 128 px windows (the tiny models' scale), no env, no .env file."""
    values: dict[str, Any] = {
        "slice_height": 128,
        "slice_width": 128,
        "score_threshold": 0.3,
        "device": "cpu",
        "window_batch_size": 4,
        # Tests serve on loopback: auth stays off unless a test asks for it (test_auth.py).
        "host": "127.0.0.1",
        # Never the user's real MODEL_DIR (~/.local/share/label-studio-sahi).
        "model_dir": Path(tempfile.mkdtemp(dir=_model_dirs())),
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, for processes started like a user starts
    them (workers, servers), plus this process's variables that are not settings."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    for name, value in settings:
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class LiveServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


def start_uvicorn(app: Any, settings: Settings | None = None) -> LiveServer:
    """Serve ``app`` on 127.0.0.1 on a free port in a thread (real HTTP), configured as
    ``ls-sahi serve`` configures uvicorn (http_limits.py) from ``settings``: by default the
    app's own (``create_app`` keeps them on ``app.state``)."""
    if settings is None:
        settings = getattr(getattr(app, "state", None), "settings", None) or make_settings()
    config = uvicorn_config(
        app, settings, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", server, thread)


def stop_uvicorn(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=10)


@contextmanager
def serving(bundle: Any, **overrides: Any) -> Iterator[LiveServer]:
    """The backend with ``bundle`` and test settings (``overrides``) on a real uvicorn.

    The socket is 127.0.0.1 whatever HOST says: HOST decides the login and the default
    ALLOWED_HOSTS, not where the test server listens."""
    from label_studio_sahi.serving.routes import create_app
    from label_studio_sahi.serving.state import Service

    settings = make_settings(**overrides)
    live = start_uvicorn(create_app(settings, Service(settings, bundle)))
    try:
        yield live
    finally:
        stop_uvicorn(live)
