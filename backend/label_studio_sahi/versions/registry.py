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
    def __init__(self, root: Path, redis_client: redis.Redis | None = None) -> None:
        self.root = root
        self.redis = redis_client

    @classmethod
    def for_settings(cls, settings: Settings, redis_client: redis.Redis | None = None) -> Registry:
        """The registry of ``MODEL_DIR``'s versions."""
        return cls(names.projects_root(settings.model_dir), redis_client)

    def project_dir(self, project: str) -> Path:
        if not names.PROJECT_ID.fullmatch(project):
            raise ValueError(f"invalid project id {project!r}")
        return self.root / project

    # --- versions on disk ------------------------------------------------------------------

    def projects(self) -> list[str]:
        """Projects that have a folder of versions."""
        if not self.root.is_dir():
            return []
        found = (p.name for p in self.root.iterdir() if p.is_dir())
        return sorted(n for n in found if names.PROJECT_ID.fullmatch(n))

    def versions(self, project: str) -> list[Version]:
        """Complete versions, oldest first."""
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
        """Write a version atomically: ``write(tmp_folder)``, then meta.json, then rename.

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
            while True:
                existing = self.versions(project)
                name = names.version_name((existing[-1].number if existing else 0) + 1)
                try:
                    # rename(2) is atomic and fails if the target exists and is not empty.
                    tmp.rename(folder / name)
                    break
                except OSError:
                    if not (folder / name).exists():
                        raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(folder)  # the rename itself
        version = self.get(project, name)
        log.info("version_published project=%s version=%s status=%s", project, name, version.status)
        return version

    def prune(self, project: str, keep: int) -> list[str]:
        """Keep the newest ``keep`` accepted versions (rollback targets) and the newest
        ``keep`` rejected ones (for inspection), and always the live one; delete the rest.
        Returns their names."""
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
            # Rename first so that a half-deleted folder is never listed.
            trash = version.path.with_name(f"{names.TRASH_PREFIX}{uuid.uuid4().hex}")
            version.path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
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
        value = self._redis().get(LIVE_KEY.format(project=project))
        return value.decode() if isinstance(value, bytes) else value

    def live_projects(self) -> dict[str, str]:
        """Every project with a live fine-tuned version: ``{project: version name}``."""
        client = self._redis()
        found = {}
        for key in client.scan_iter(LIVE_PATTERN):
            name = key.decode() if isinstance(key, bytes) else key
            value = client.get(name)
            if value is not None:
                found[name.rsplit(":", 1)[1]] = (
                    value.decode() if isinstance(value, bytes) else value
                )
        return found

    def set_live(self, project: str, name: str | None) -> None:
        """Point the project at version ``name`` (None: back to the base model) and announce it."""
        client = self._redis()
        if name is None:
            client.delete(LIVE_KEY.format(project=project))
        else:
            name = self.get(project, name).name  # refuse a version that does not exist
            client.set(LIVE_KEY.format(project=project), name)
        client.publish(LIVE_CHANNEL, json.dumps({"project": project, "version": name}))
        log.info("live_version_set project=%s version=%s", project, name)
