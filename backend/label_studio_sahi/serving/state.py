"""The serving process's state: models loaded once, the predictor per project, known configs.

Projects start on the base models. When a project's live version changes (a fine-tuning
job promoted a checkpoint, or someone rolled back), this process loads the new version in
the background, checks that it runs, and then swaps one reference: requests already in
flight keep the predictor they started with and finish on the old model; a version that
fails to load is refused and the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from label_studio_sahi import metrics
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.jobs.trigger import TrainingTrigger
from label_studio_sahi.labelstudio.label_config import LabelConfig
from label_studio_sahi.serving.hot_swap import LiveWatcher
from label_studio_sahi.serving.pipeline import ImageLoaderFn, Predictor
from label_studio_sahi.settings import Settings
from label_studio_sahi.versions.bundles import (
    ModelBundle,
    check_bundle,
    load_base_bundle,
    load_version_bundle,
)
from label_studio_sahi.versions.registry import Registry, Version, VersionNotFound
from label_studio_sahi.versions.store import StoreCorrupt, StoreUnavailable

log = logging.getLogger(__name__)

FETCH_RETRY_MIN = 1.0  # seconds before a failed download of a live version is tried again,
FETCH_RETRY_MAX = 60.0  # doubling each time up to this


class Service:
    def __init__(
        self,
        settings: Settings,
        bundle: ModelBundle,
        load_image: ImageLoaderFn | None = None,
        redis_client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self._loader = ImageLoader(settings) if load_image is None else None
        self._load_image: ImageLoaderFn = load_image or self._loader.load_encoded  # type: ignore[union-attr]
        self._pool = ThreadPoolExecutor(settings.image_fetch_concurrency, thread_name_prefix="task")
        self.base = Predictor(bundle, settings, self._load_image, self._pool)
        self.redis = redis_client
        self.registry = Registry.for_settings(settings, redis_client)
        self.trigger = TrainingTrigger(redis_client, settings) if redis_client is not None else None
        # Both bounded, least recently used first out: configs by their text's size, models
        # by count (an unloaded project's live version is loaded again when asked for).
        self._configs: OrderedDict[str | None, tuple[LabelConfig, int]] = OrderedDict()
        self._config_bytes = 0
        self._predictors: OrderedDict[str, Predictor] = OrderedDict()  # project -> fine-tuned
        self._unloaded: set[str] = set()  # projects whose live version was unloaded
        self._refused: dict[str, str] = {}  # project -> version that failed to load
        # (project, version) -> (monotonic time of the next try, the delay before it)
        self._fetch_retry: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._watcher = (
            LiveWatcher(redis_client, self.refresh, settings.swap_poll_seconds)
            if redis_client is not None
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings, redis_client: redis.Redis | None = None) -> Service:
        return cls(settings, load_base_bundle(settings), redis_client=redis_client)

    @property
    def base_version(self) -> str:
        return self.base.bundle.version

    def start(self) -> None:
        metrics.MODEL_INFO.labels(project="*", model_version=self.base_version).set(1)
        if self._watcher is not None:
            self.refresh(None)  # serve live versions from the first request on
            self._watcher.start()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loader is not None:
            self._loader.close()

    # --- configs ---------------------------------------------------------------------------

    def remember_config(self, project: str | None, config: LabelConfig, size: int) -> None:
        """Keep ``config`` (``size``: its text's length) as ``project``'s, within
        CONFIG_CACHE_BYTES for all projects together."""
        with self._lock:
            if project in self._configs:
                self._config_bytes -= self._configs.pop(project)[1]
            self._configs[project] = (config, size)
            self._config_bytes += size
            while self._config_bytes > self.settings.config_cache_bytes and len(self._configs) > 1:
                self._config_bytes -= self._configs.popitem(last=False)[1][1]

    def config_for(self, project: str | None) -> LabelConfig | None:
        with self._lock:
            found = self._configs.get(project)
            if found is None:
                return None
            self._configs.move_to_end(project)
            return found[0]

    # --- which model serves a project ----------------------------------------------------------

    def predictor_for(self, project: str | None) -> Predictor:
        """The project's predictor. May load a model (a project unloaded to keep within
        MAX_PROJECT_MODELS): call it off the event loop."""
        key = project or ""
        with self._lock:
            found = self._predictors.get(key)
            if found is not None:
                self._predictors.move_to_end(key)
                return found
            reload = key in self._unloaded
        if reload:
            self.refresh(key)
            with self._lock:
                return self._predictors.get(key, self.base)
        return self.base

    def loaded_projects(self) -> list[str]:
        """Projects whose fine-tuned models are in memory, least recently used first."""
        with self._lock:
            return list(self._predictors)

    def version_for(self, project: str | None) -> str:
        return self.predictor_for(project).bundle.version

    def versions(self, project: str | None) -> list[str]:
        """Model versions of a project (Label Studio asks without one: then of every
        project), newest first, the base models last."""
        projects = [project] if project else self.registry.projects()
        # Rejected versions are kept for inspection (ls-sahi versions), never served.
        found = [v for p in projects for v in self.registry.versions(p) if v.status != "rejected"]
        found.sort(key=lambda v: (v.meta.get("created_at", ""), v.number), reverse=True)
        return [*(v.model_version for v in found), self.base_version]

    def refresh(self, project: str | None) -> None:
        """Bring one project (or, with None, every project) to its live version."""
        if self.redis is None:
            return
        with self._swap_lock:  # one load at a time; requests are never blocked by it
            # One project (a pub/sub message, a reload on demand): its own key, not a scan.
            live: dict[str, str | None] = (
                {project: self.registry.live(project)}
                if project is not None
                else dict(self.registry.live_projects())
            )
            projects = (
                [project] if project is not None else sorted(set(live) | set(self._predictors))
            )
            for name in projects:
                if project is None and live.get(name) and name not in self._predictors:
                    # Past MAX_PROJECT_MODELS, or unloaded to stay within it: loaded when a
                    # request asks for it, not on every poll.
                    full = len(self._predictors) >= self.settings.max_project_models
                    if name in self._unloaded or full:
                        with self._lock:
                            self._unloaded.add(name)
                        continue
                self._bring_to(name, live.get(name))

    def _bring_to(self, project: str, wanted: str | None) -> None:
        with self._lock:
            current = self._predictors.get(project, self.base)
        if wanted is None:
            with self._lock:
                self._unloaded.discard(project)
                old = self._predictors.pop(project, None)
            if old is not None:
                log.info(
                    "version_swapped project=%s from=%s to=%s",
                    project,
                    old.bundle.version,
                    self.base_version,
                )
            return
        try:
            version = self.registry.get(project, wanted)
        except VersionNotFound:
            if not self.registry.store_ok:
                return  # listed from the cache while the store is down: asked again later
            if self._refused.get(project) != wanted:
                log.error(
                    "version_refused project=%s version=%s error=not_on_disk keeps=%s",
                    project,
                    wanted,
                    current.bundle.version,
                )
            self._refused[project] = wanted
            return
        if current.bundle.version == version.model_version or self._refused.get(project) == wanted:
            return
        if not self._fetched(version, current.bundle.version):
            return
        bundle = self._loadable(version)
        fallback = bundle is None
        if bundle is None:
            self._refused[project] = wanted  # not retried until the live pointer moves
            # A fresh process has only the base: serve the newest older version that loads.
            older = [
                v for v in reversed(self.registry.versions(project))
                if v.number < version.number and v.status != "rejected"
            ]  # fmt: skip
            if current.bundle.version == self.base_version:
                bundle = next((b for v in older if (b := self._loadable(v)) is not None), None)
            if bundle is None:
                return
            log.error(
                "version_fallback project=%s wanted=%s serves=%s", project, wanted, bundle.version
            )
        predictor = Predictor(bundle, self.settings, self._load_image, self._pool)
        with self._lock:
            self._predictors[project] = predictor  # the swap: one reference
            self._predictors.move_to_end(project)
            self._unloaded.discard(project)
            while len(self._predictors) > self.settings.max_project_models:
                gone, _ = self._predictors.popitem(last=False)
                self._unloaded.add(gone)
                log.info("project_unloaded project=%s (MAX_PROJECT_MODELS)", gone)
        if not fallback:
            self._refused.pop(project, None)
        metrics.MODEL_INFO.labels(project=project, model_version=bundle.version).set(1)
        log.info(
            "version_swapped project=%s from=%s to=%s",
            project,
            current.bundle.version,
            bundle.version,
        )

    def _fetched(self, version: Version, serving: str) -> bool:
        """Whether ``version``'s files are on this disk (with MODEL_STORE: downloaded and
        verified now). A store that does not answer, or a copy that fails its checksums,
        keeps the current version serving; it is tried again with a backoff that doubles
        up to ``FETCH_RETRY_MAX`` seconds, since a store comes back and an upload completes."""
        key = (version.project, version.name)
        wait_until, delay = self._fetch_retry.get(key, (0.0, 0.0))
        if time.monotonic() < wait_until:
            return False
        try:
            self.registry.local(version)
        except (StoreUnavailable, StoreCorrupt) as exc:
            delay = min(max(2 * delay, FETCH_RETRY_MIN), FETCH_RETRY_MAX)
            self._fetch_retry[key] = (time.monotonic() + delay, delay)
            log.error(
                "version_fetch_failed project=%s version=%s error=%s keeps=%s retry_in=%.0fs",
                version.project, version.name, exc.code, serving, delay,
            )  # fmt: skip
            return False
        self._fetch_retry.pop(key, None)
        return True

    def _loadable(self, version: Version) -> ModelBundle | None:
        """The version's models, loaded and checked; None (logged) when they do not load."""
        try:
            bundle = load_version_bundle(
                self.registry.local(version), lambda: self.base.bundle.classifier, self.settings
            )
            check_bundle(bundle)
        except Exception as exc:
            log.error(
                "version_refused project=%s version=%s error=%s",
                version.project, version.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )  # fmt: skip
            return None
        return bundle

    # --- webhooks ------------------------------------------------------------------------------

    def on_webhook(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.trigger is None:
            return 200, {"status": "training not configured", "action": body.get("action")}
        return self.trigger.on_webhook(body)
