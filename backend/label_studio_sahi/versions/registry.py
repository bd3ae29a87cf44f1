"""Checkpoint versions per project, and which one is live.

On disk, under ``MODEL_DIR/projects/<project>/``::

    v1/  detector/ (save_pretrained: config.json, model.safetensors, preprocessor_config.json)
         classifier/ (optional, same layout)
         meta.json   (status, parent, metrics, label map, dataset stats, training curve)
         curves.png
    v2/ ...

A version is written into a hidden temporary folder and renamed into place only when
complete, so a crash mid-write leaves no partial version: listing, loading and rollback only
ever see folders named ``v<N>`` that hold ``meta.json``. The live version of each project
is a Redis key; changing it is announced on a pub/sub channel (serving processes also poll).

With ``MODEL_STORE`` set, the object store (``store.ObjectStore``) is where versions live:
listing reads its manifests, ``publish`` uploads before the name exists for anyone, and
``MODEL_DIR/projects`` becomes this machine's cache of downloaded versions (``local``),
bounded by ``MODEL_CACHE_BYTES``. With the store unreachable, the cached versions are
listed and served, and ``store_ok`` says so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from label_studio_sahi import names
from label_studio_sahi.errors import BackendError
from label_studio_sahi.names import LIVE_CHANNEL, LIVE_KEY, LIVE_PATTERN, META_FILE, model_version
from label_studio_sahi.versions.store import ObjectStore, StoreUnavailable

if TYPE_CHECKING:
    from label_studio_sahi.settings import Settings

log = logging.getLogger(__name__)


class VersionNotFound(BackendError):
    status = 404
    code = "version_not_found"


@dataclass(frozen=True)
class Version:
    project: str
    name: str  # "v3"
    path: Path
    meta: dict[str, Any]

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def status(self) -> str:
        return str(self.meta.get(names.META_STATUS, "accepted"))

    @property
    def model_version(self) -> str:
        """What Label Studio shows and compares: ``p<project>-v<N>``."""
        return model_version(self.project, self.name)

    @property
    def held_out(self) -> dict[str, Any]:
        """The version's own held-out metrics (mAP, mAP@.5, small AP...), as its job
        measured them; empty when it has none (an imported or older version)."""
        metrics: dict[str, Any] = (self.meta.get(names.META_METRICS) or {}).get("candidate") or {}
        return metrics


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then every folder, to disk."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(root)


class Registry:
    def __init__(
        self,
        root: Path,
        redis_client: redis.Redis | None = None,
        store: ObjectStore | None = None,
        cache_bytes: int = 0,
    ) -> None:
        self.root = root
        self.redis = redis_client
        self.store = store
        self.cache_bytes = cache_bytes
        self.store_ok = True  # the last call to the store answered

    @classmethod
    def for_settings(cls, settings: Settings, redis_client: redis.Redis | None = None) -> Registry:
        """The registry of ``MODEL_STORE``'s versions, or of ``MODEL_DIR``'s."""
        store = (
            ObjectStore(settings.model_store, settings.store_timeout_seconds)
            if settings.model_store
            else None
        )
        return cls(
            names.projects_root(settings.model_dir), redis_client, store, settings.model_cache_bytes
        )

    def project_dir(self, project: str) -> Path:
        if not names.PROJECT_ID.fullmatch(project):
            raise ValueError(f"invalid project id {project!r}")
        return self.root / project

    # --- versions on disk ------------------------------------------------------------------

    def projects(self) -> list[str]:
        """Projects that have versions."""
        local = self._local_projects()
        if self.store is None:
            return local
        stored = self._from_store(self.store.projects)
        return local if stored is None else sorted(set(stored) | set(local))

    def _local_projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = (p.name for p in self.root.iterdir() if p.is_dir())
        return sorted(n for n in found if names.PROJECT_ID.fullmatch(n))

    def versions(self, project: str) -> list[Version]:
        """Complete versions, oldest first: the store's, or (without one, or while it does
        not answer) those on this disk."""
        folder = self.project_dir(project)
        if self.store is not None:
            manifests = self._from_store(lambda: self.store.manifests(project))  # type: ignore[union-attr]
            if manifests is not None:
                found = [Version(project, n, folder / n, m["meta"]) for n, m in manifests.items()]
                return sorted(found, key=lambda v: v.number)
        return self._local_versions(project)

    def _local_versions(self, project: str) -> list[Version]:
        folder = self.project_dir(project)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            match = names.VERSION_DIR.match(child.name)
            meta_file = child / META_FILE
            if match and meta_file.is_file():
                found.append(Version(project, child.name, child, json.loads(meta_file.read_text())))
        return sorted(found, key=lambda v: v.number)

    def _from_store(self, call: Callable[[], Any]) -> Any:
        """``call()``'s answer, or None when the store does not answer (logged once per
        outage; ``store_ok`` tells /health)."""
        try:
            answer = call()
        except StoreUnavailable as exc:
            if self.store_ok:
                log.warning("store_unavailable error=%s using=cache", exc.message)
            self.store_ok = False
            return None
        if not self.store_ok:
            log.info("store_available")
        self.store_ok = True
        return answer

    def local(self, version: Version) -> Version:
        """``version`` with its files on this machine: downloaded from the store into
        ``MODEL_DIR`` (verified) if not there yet. Raises ``StoreUnavailable`` or
        ``StoreCorrupt`` when they cannot be had; nothing partial is left."""
        if self.store is None or (version.path / META_FILE).is_file():
            if version.path.is_dir():
                os.utime(version.path)  # recently used: the cache keeps it longest
            return version
        self.store.pull(version.project, version.name, version.path)
        self._trim_cache(keep=version.path)
        return version

    def read_file(self, version: Version, path: str) -> bytes | None:
        """One file of a version (``curves.png``), without downloading the rest; None if
        the version has no such file."""
        local = version.path / path
        if local.is_file():
            return local.read_bytes()
        if self.store is None:
            return None
        manifest = self.store.manifests(version.project).get(version.name) or {}
        if path not in manifest.get("files", {}):
            return None
        return self.store.read(version.project, version.name, path)

    def has_file(self, version: Version, path: str) -> bool:
        if (version.path / path).is_file() or self.store is None:
            return (version.path / path).is_file()
        manifest = self._from_store(lambda: self.store.manifests(version.project))  # type: ignore[union-attr]
        return bool(manifest) and path in manifest.get(version.name, {}).get("files", {})

    def _trim_cache(self, keep: Path) -> None:
        """Delete the least recently used downloaded versions, never a live one nor
        ``keep``, until the cache holds at most ``cache_bytes``."""
        cached = [
            child
            for project in self._local_projects()
            for child in self.project_dir(project).iterdir()
            if names.VERSION_DIR.match(child.name)
        ]
        sizes = {c: sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in cached}
        total = sum(sizes.values())
        live = set()
        if self.redis is not None:
            try:
                live = {self.project_dir(p) / n for p, n in self.live_projects().items()}
            except (redis.RedisError, OSError):
                return  # which versions are live is unknown: evict nothing for now
        for child in sorted(cached, key=lambda c: c.stat().st_mtime):
            if total <= self.cache_bytes:
                break
            if child == keep or child in live:
                continue
            trash = child.with_name(f"{names.TRASH_PREFIX}{uuid.uuid4().hex}")
            child.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
            total -= sizes[child]
            log.info("cache_evicted project=%s version=%s", child.parent.name, child.name)

    def get(self, project: str, name: str) -> Version:
        for version in self.versions(project):
            if version.name == name or version.model_version == name:
                return version
        raise VersionNotFound(f"project {project} has no version {name!r}")

    def find_by_run(self, project: str, run_id: str) -> Version | None:
        """The version an earlier try of this run already published (rq may run a job twice)."""
        return next(
            (v for v in self.versions(project) if v.meta.get(names.META_RUN_ID) == run_id), None
        )

    def publish(self, project: str, write: Callable[[Path], None], meta: dict[str, Any]) -> Version:
        """Write a version atomically: ``write(tmp_folder)``, then meta.json, then rename
        (with a store: upload every file, then the manifest, then rename into the cache).

        Returns the new version (not made live: see ``set_live``).
        """
        folder = self.project_dir(project)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{names.TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            meta = {**meta, names.META_CREATED_AT: datetime.now(UTC).isoformat(timespec="seconds")}
            with (tmp / META_FILE).open("w") as handle:
                json.dump(meta, handle, indent=2, default=str)
            # Weights, meta and folders on disk before the name exists: a power cut after
            # set_live must not leave a live version of empty files.
            _fsync_tree(tmp)
            name = self._upload(project, tmp, meta) if self.store else self._rename(tmp, folder)
            if self.store is not None:
                self._discard(folder / name)  # a stale copy in the cache, never listed
                tmp.rename(folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(folder)  # the rename itself
        version = self.get(project, name)
        log.info("version_published project=%s version=%s status=%s", project, name, version.status)
        return version

    def _rename(self, tmp: Path, folder: Path) -> str:
        """Rename ``tmp`` to the next free ``v<N>`` of ``folder``: its name."""
        while True:
            existing = self._local_versions(folder.name)
            name = names.version_name((existing[-1].number if existing else 0) + 1)
            try:
                # rename(2) is atomic and fails if the target exists and is not empty.
                tmp.rename(folder / name)
                return name
            except OSError:
                if not (folder / name).exists():
                    raise

    def _upload(self, project: str, tmp: Path, meta: dict[str, Any]) -> str:
        """Upload ``tmp`` as the store's next ``v<N>`` of ``project``: its name. The manifest
        goes last and only where none is, so a name taken meanwhile is tried again."""
        assert self.store is not None
        while True:
            taken = self.store.manifests(project)
            number = max((int(n[1:]) for n in taken), default=0) + 1
            name = names.version_name(number)
            if self.store.push(project, name, tmp, meta):
                return name

    def _discard(self, path: Path) -> None:
        if path.exists():
            # Rename first so that a half-deleted folder is never listed.
            trash = path.with_name(f"{names.TRASH_PREFIX}{uuid.uuid4().hex}")
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def prune(self, project: str, keep: int) -> list[str]:
        """Keep the newest ``keep`` accepted versions (rollback targets) and the newest
        ``keep`` rejected ones (for inspection), and always the live one; delete the rest
        (from the store first, where there is one). Returns their names."""
        live = self.live(project)
        doomed = []
        for status in ("accepted", "rejected"):
            kind = [
                v
                for v in self.versions(project)
                if (v.status == "rejected") == (status == "rejected")
            ]
            doomed += [v for v in kind[: max(0, len(kind) - keep)] if v.name != live]
        for version in doomed:
            if self.store is not None:
                self.store.delete(project, version.name)
            self._discard(version.path)
        return [v.name for v in doomed]

    def clean_temporary(self, project: str) -> None:
        """Remove leftovers of writes that died (a killed worker)."""
        folder = self.project_dir(project)
        for child in folder.glob(f"{names.TMP_PREFIX}*") if folder.is_dir() else []:
            shutil.rmtree(child, ignore_errors=True)

    # --- live pointers in Redis ------------------------------------------------------------

    def _redis(self) -> redis.Redis:
        if self.redis is None:
            raise RuntimeError("this registry has no Redis connection")
        return self.redis

    def live(self, project: str) -> str | None:
        """The project's live version; None for the base models. With no pointer in Redis
        at all (Redis lost or replaced), its newest accepted version, so that a new Redis
        does not send every project back to its base model."""
        value = self._redis().get(LIVE_KEY.format(project=project))
        if value is None:
            return self._newest_accepted(project)
        name = value.decode() if isinstance(value, bytes) else str(value)
        return None if name == names.LIVE_BASE else name

    def _newest_accepted(self, project: str) -> str | None:
        accepted = [v for v in self.versions(project) if v.status == "accepted"]
        return accepted[-1].name if accepted else None

    def live_projects(self) -> dict[str, str]:
        """Every project with a live fine-tuned version: ``{project: version name}``
        (projects without a pointer: their newest accepted version, as ``live``)."""
        client = self._redis()
        found: dict[str, str] = {}
        pointed = set()
        for key in client.scan_iter(LIVE_PATTERN):
            name = key.decode() if isinstance(key, bytes) else key
            value = client.get(name)
            project = name.rsplit(":", 1)[1]
            pointed.add(project)
            if value is not None:
                version = value.decode() if isinstance(value, bytes) else value
                if version != names.LIVE_BASE:
                    found[project] = version
        for project in self.projects():
            if project not in pointed and (newest := self._newest_accepted(project)):
                found[project] = newest
        return found

    def set_live(self, project: str, name: str | None) -> None:
        """Point the project at version ``name`` (None: back to the base model) and announce it."""
        client = self._redis()
        if name is None:
            client.set(LIVE_KEY.format(project=project), names.LIVE_BASE)
        else:
            name = self.get(project, name).name  # refuse a version that does not exist
            client.set(LIVE_KEY.format(project=project), name)
        client.publish(LIVE_CHANNEL, json.dumps({"project": project, "version": name}))
        log.info("live_version_set project=%s version=%s", project, name)
