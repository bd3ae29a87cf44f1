"""Versions in an S3-compatible object store (``MODEL_STORE=s3://bucket/prefix``), so that
workers and serving processes on several machines share them without a shared disk.

Layout, under the prefix: ``projects/<project>/v<N>/<files>`` (a version folder as the
registry writes it on disk) and ``projects/<project>/v<N>/manifest.json``, written last:
``{"files": {path: {"size", "sha256"}}, "meta": {...}}``. A version without a manifest
exists for nobody: a worker killed mid-upload leaves objects nobody lists, and the next
publish of that name overwrites them. The manifest is written only if none exists
(``If-None-Match: *``), so two writers never both own a name.

Downloads go into a temporary folder beside the target, every file is checked against
the manifest's size and sha256, and only a complete, verified copy is renamed into place.

The client is boto3, configured the standard way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, or the usual credential chain).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from label_studio_sahi import metrics, names
from label_studio_sahi.errors import BackendError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read at a time when hashing


class StoreUnavailable(BackendError):
    """The object store did not answer (down, unreachable, refused the credentials)."""

    status = 503
    code = "store_unavailable"


class StoreCorrupt(BackendError):
    """A stored version does not match its manifest (a missing or altered object)."""

    status = 502
    code = "store_corrupt"


@dataclass(frozen=True)
class StoreLocation:
    bucket: str
    prefix: str  # "" or "some/prefix/"

    @classmethod
    def parse(cls, url: str) -> StoreLocation:
        """``s3://bucket`` or ``s3://bucket/prefix``."""
        scheme, sep, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme != "s3" or not sep or not bucket:
            raise ValueError(f"MODEL_STORE must look like s3://bucket/prefix, got {url!r}")
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path.relative_to(folder).as_posix(), path


class ObjectStore:
    """One bucket and prefix of an S3-compatible store, holding every project's versions."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        import boto3
        from botocore.config import Config

        self.location = StoreLocation.parse(url)
        self.url = url
        retries: Any = {"max_attempts": 2, "mode": "standard"}
        self.client = boto3.client(
            "s3", config=Config(connect_timeout=timeout, read_timeout=timeout, retries=retries)
        )
        # /health asks through its own client, which gives up after 2 s and one try.
        once: Any = {"max_attempts": 1}
        self._probe = boto3.client(
            "s3", config=Config(connect_timeout=2, read_timeout=2, retries=once)
        )
        self._manifests: dict[str, dict[str, Any]] = {}  # key -> manifest: never changes

    # --- keys -------------------------------------------------------------------------------

    def _version_key(self, project: str, name: str) -> str:
        return f"{self.location.prefix}{names.PROJECTS_DIR}/{project}/{name}/"

    def _manifest_key(self, project: str, name: str) -> str:
        return self._version_key(project, name) + names.MANIFEST_FILE

    # --- calls, with the store's errors as ours ---------------------------------------------

    def _call(self, operation: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.location.bucket, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound", "PreconditionFailed", "412"):
                raise
            metrics.STORE_ERRORS.labels(operation=operation).inc()
            raise StoreUnavailable(f"object store {operation} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            metrics.STORE_ERRORS.labels(operation=operation).inc()
            raise StoreUnavailable(
                f"object store {operation} failed: {type(exc).__name__}"
            ) from exc

    def _keys(self, prefix: str) -> Iterator[str]:
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list_objects_v2", Prefix=prefix, **extra)
            for item in page.get("Contents", []):
                yield str(item["Key"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def ping(self) -> bool:
        """Whether the bucket answers (within 2 s: /health must answer fast)."""
        try:
            self._probe.head_bucket(Bucket=self.location.bucket)
        except Exception:
            return False
        return True

    # --- reading ----------------------------------------------------------------------------

    def projects(self) -> list[str]:
        root = f"{self.location.prefix}{names.PROJECTS_DIR}/"
        found = {key[len(root) :].split("/", 1)[0] for key in self._keys(root)}
        return sorted(p for p in found if names.PROJECT_ID.fullmatch(p))

    def manifests(self, project: str) -> dict[str, dict[str, Any]]:
        """``{version name: manifest}`` of every complete version of ``project``."""
        root = f"{self.location.prefix}{names.PROJECTS_DIR}/{project}/"
        found = {}
        for key in self._keys(root):
            name, _, rest = key[len(root) :].partition("/")
            if rest == names.MANIFEST_FILE and names.VERSION_DIR.fullmatch(name):
                found[name] = self._manifest(key)
        return found

    def _manifest(self, key: str) -> dict[str, Any]:
        if key not in self._manifests:
            body = self._call("get_object", Key=key)["Body"].read()
            self._manifests[key] = json.loads(body)
        return self._manifests[key]

    def read(self, project: str, name: str, path: str) -> bytes:
        """One file of a version, checked against its manifest."""
        manifest = self._manifest(self._manifest_key(project, name))
        entry = manifest["files"].get(path)
        if entry is None:
            raise StoreCorrupt(f"{project}/{name} has no file {path!r}")
        data = self._get(self._version_key(project, name) + path, project, name)
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreCorrupt(f"{project}/{name}/{path} does not match its manifest")
        return data

    def _get(self, key: str, project: str, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return bytes(self._call("get_object", Key=key)["Body"].read())
        except ClientError as exc:
            raise StoreCorrupt(f"{project}/{name} lacks {key.rsplit('/', 1)[-1]}") from exc

    def pull(self, project: str, name: str, target: Path) -> None:
        """Download a version into ``target`` (which must not exist), verified file by file
        against the manifest, renamed into place only when complete."""
        manifest = self._manifest(self._manifest_key(project, name))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{names.TMP_PREFIX}{uuid.uuid4().hex}")
        tmp.mkdir()
        try:
            for path, entry in manifest["files"].items():
                local = tmp / path
                if ".." in Path(path).parts:  # a manifest names files inside its version only
                    raise StoreCorrupt(f"{project}/{name} names a file outside it: {path!r}")
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(self._get(self._version_key(project, name) + path, project, name))
                if local.stat().st_size != entry["size"] or sha256_of(local) != entry["sha256"]:
                    metrics.STORE_ERRORS.labels(operation="verify").inc()
                    raise StoreCorrupt(f"{project}/{name}/{path} does not match its manifest")
            try:
                tmp.rename(target)
            except OSError:
                if not (target / names.META_FILE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another thread's copy came first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("version_downloaded project=%s version=%s files=%d", project, name,
                 len(manifest["files"]))  # fmt: skip

    # --- writing ----------------------------------------------------------------------------

    def push(self, project: str, name: str, folder: Path, meta: dict[str, Any]) -> bool:
        """Upload ``folder`` as version ``name``: every file, then the manifest. False when
        another writer's manifest already holds the name (nothing of theirs is touched but
        objects no manifest lists)."""
        from botocore.exceptions import ClientError

        prefix = self._version_key(project, name)
        files = {}
        for path, local in _files(folder):
            files[path] = {"size": local.stat().st_size, "sha256": sha256_of(local)}
            with local.open("rb") as handle:
                self._call("put_object", Key=prefix + path, Body=handle)
        manifest = {"files": files, "meta": meta}
        try:
            self._call(
                "put_object",
                Key=prefix + names.MANIFEST_FILE,
                Body=json.dumps(manifest, indent=2, default=str).encode(),
                IfNoneMatch="*",
            )
        except ClientError:
            return False
        log.info("version_uploaded project=%s version=%s files=%d", project, name, len(files))
        return True

    def delete(self, project: str, name: str) -> None:
        """The manifest first (the version is gone for everyone at once), then its files."""
        prefix = self._version_key(project, name)
        self._call("delete_object", Key=prefix + names.MANIFEST_FILE)
        self._manifests.pop(prefix + names.MANIFEST_FILE, None)
        for key in list(self._keys(prefix)):
            self._call("delete_object", Key=key)
