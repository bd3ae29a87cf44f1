"""A backend serving the curators' page, for tests: a project of 8 labelled tasks in a
Label Studio stand-in, two published versions of it (v2 live), a real Redis and a real
uvicorn server (test_ui.py, test_cross_site.py, test_page_limits.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from labelled_project import labelled_project
from stack import stack_settings

from label_studio_sahi import names
from label_studio_sahi.jobs.redis_server import connect
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.settings import Settings
from label_studio_sahi.training.plots import plot_curves
from label_studio_sahi.versions.bundles import ModelBundle
from label_studio_sahi.versions.registry import Registry
from testkit.fake_studio import FakeStudio
from testkit.servers import LiveServer, start_uvicorn, stop_uvicorn


@dataclass
class Backend:
    url: str
    settings: Settings
    registry: Registry
    redis: redis.Redis
    project: str
    task: int  # one of the project's tasks; its image is an upload in the stand-in
    image_url: str


def changed(settings: Settings, **values: Any) -> Settings:
    return Settings(_env_file=None, **{**settings.model_dump(), **values})  # type: ignore[call-arg]


def checkpoint(source: Path, metrics: dict[str, float], tasks: int) -> Any:
    def write(folder: Path) -> None:
        shutil.copytree(source, folder / names.DETECTOR_DIR)
        loss = [2.0 / (1 + step / 20) for step in range(200)]  # as the job plots its own
        plot_curves({"detector": loss}, folder / names.CURVES_FILE)

    meta = {
        names.META_STATUS: "accepted",
        names.META_METRICS: {"candidate": metrics, "live": {"map_50": 0.1}},
        "dataset": {"train_tasks": tasks, "heldout_tasks": 2},
    }
    return write, meta


@contextmanager
def serving_page(
    bundle: ModelBundle,
    redis_url: str,
    detector_dir: Path,
    fake: FakeStudio,
    folder: Path,
    **overrides: Any,
) -> Iterator[Backend]:
    """The backend; ``overrides`` change its settings (THREADS...)."""
    project = labelled_project(fake, n_tasks=8)
    pid = str(project.id)
    # Long enough that the job is still training while the browser looks at it.
    settings = stack_settings(
        fake, redis_url, detector_dir, folder / "models", train_steps=20_000,
        train_min_steps=20_000, job_retries=0, **overrides,
    )  # fmt: skip
    client = connect(redis_url)
    registry = Registry.for_settings(settings, client)
    for metrics, tasks in (({"map": 0.21, "map_50": 0.52, "map_small": 0.18}, 10),
                           ({"map": 0.27, "map_50": 0.61, "map_small": 0.24}, 25)):  # fmt: skip
        write, meta = checkpoint(detector_dir, metrics, tasks)
        registry.publish(pid, write, {**meta, names.META_PARENT: "base"})
    registry.set_live(pid, "v2")
    # The service reads task images from the stand-in as from Label Studio (its token).
    service = Service(settings, ModelBundle(bundle.detector, None), redis_client=client)
    live: LiveServer = start_uvicorn(create_app(settings, service))
    task = project.task_ids[0]
    try:
        yield Backend(
            live.url, settings, registry, client, pid, task, fake.tasks[task]["data"]["image"]
        )
    finally:
        stop_uvicorn(live)
