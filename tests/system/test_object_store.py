"""Versions in a real S3-compatible store (SeaweedFS on 127.0.0.1): published with their
manifest last, downloaded by another machine's registry and verified, refused when an
object is altered, listed from the cache while the store is down."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from label_studio_sahi import names
from label_studio_sahi.versions.registry import Registry
from label_studio_sahi.versions.store import ObjectStore, StoreCorrupt, StoreUnavailable
from testkit.object_store import BUCKET, SeaweedS3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def store_env(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    for key, value in s3.env().items():
        if key != "MODEL_STORE":
            monkeypatch.setenv(key, value)
    return s3


def _machine(folder: Path, s3: SeaweedS3, redis_client: Any = None, prefix: str = "") -> Registry:
    """One machine's registry: its own MODEL_DIR, the shared store."""
    return Registry(folder, redis_client, ObjectStore(f"{s3.url}{prefix}"), cache_bytes=10**9)


def _write(content: bytes) -> Any:
    def write(folder: Path) -> None:
        (folder / names.DETECTOR_DIR).mkdir()
        (folder / names.DETECTOR_DIR / "model.safetensors").write_bytes(content)

    return write


def test_a_version_published_on_one_machine_is_downloaded_verified_on_another(
    store_env: SeaweedS3, tmp_path: Path
) -> None:
    worker = _machine(tmp_path / "worker", store_env, prefix="/a")
    server = _machine(tmp_path / "server", store_env, prefix="/a")
    weights = bytes(range(256)) * 4096  # 1 MiB
    published = worker.publish("3", _write(weights), {"status": "accepted", "run_id": "r1"})
    assert published.name == "v1"

    listed = server.versions("3")
    assert [(v.name, v.status) for v in listed] == [("v1", "accepted")]
    assert not listed[0].path.exists(), "listing reads the manifest, downloads nothing"
    local = server.local(listed[0])
    assert (local.path / names.DETECTOR_DIR / "model.safetensors").read_bytes() == weights
    manifest = json.loads(
        store_env.client()
        .get_object(Bucket=BUCKET, Key=f"ls-sahi/a/projects/3/v1/{names.MANIFEST_FILE}")["Body"]
        .read()
    )
    entry = manifest["files"]["detector/model.safetensors"]
    assert entry == {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}
    assert set(manifest["files"]) == {"detector/model.safetensors", names.META_FILE}
    assert manifest["meta"]["run_id"] == "r1"

    again = worker.publish("3", _write(b"second"), {"status": "rejected"})
    assert again.name == "v2" and [v.name for v in server.versions("3")] == ["v1", "v2"]
    assert server.projects() == ["3"]


def test_objects_without_a_manifest_are_no_version_and_the_next_publish_takes_the_name(
    store_env: SeaweedS3, tmp_path: Path
) -> None:
    bucket = store_env.client()
    # What a worker killed mid-upload leaves: some files of v1, no manifest.
    bucket.put_object(Bucket=BUCKET, Key="ls-sahi/b/projects/4/v1/detector/part", Body=b"x" * 10)
    worker = _machine(tmp_path / "worker", store_env, prefix="/b")
    assert worker.versions("4") == []

    published = worker.publish("4", _write(b"clean"), {"status": "accepted"})
    assert published.name == "v1"
    other = _machine(tmp_path / "other", store_env, prefix="/b")
    local = other.local(other.get("4", "v1"))
    assert sorted(p.name for p in (local.path / names.DETECTOR_DIR).iterdir()) == [
        "model.safetensors"
    ], "only the files its manifest lists come down"


def test_an_altered_object_is_refused_and_leaves_nothing_on_disk(
    store_env: SeaweedS3, tmp_path: Path
) -> None:
    worker = _machine(tmp_path / "worker", store_env, prefix="/c")
    worker.publish("5", _write(b"good weights"), {"status": "accepted"})
    key = "ls-sahi/c/projects/5/v1/detector/model.safetensors"
    store_env.client().put_object(Bucket=BUCKET, Key=key, Body=b"evil weights")

    server = _machine(tmp_path / "server", store_env, prefix="/c")
    with pytest.raises(StoreCorrupt, match="does not match its manifest"):
        server.local(server.get("5", "v1"))
    folder = tmp_path / "server" / "5"
    assert not (folder / "v1").exists()
    assert [p.name for p in folder.iterdir()] == [], "no temporary folder is left either"

    store_env.client().delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(StoreCorrupt, match=r"lacks model\.safetensors"):
        server.local(server.get("5", "v1"))


def test_pruning_deletes_from_the_store_for_every_machine(
    store_env: SeaweedS3, tmp_path: Path, redis_client: Any
) -> None:
    worker = _machine(tmp_path / "worker", store_env, redis_client, prefix="/d")
    for i in range(3):
        worker.publish("6", _write(bytes([i])), {"status": "accepted"})
    worker.set_live("6", "v1")
    assert worker.prune("6", keep=1) == ["v2"]
    server = _machine(tmp_path / "server", store_env, prefix="/d")
    assert [v.name for v in server.versions("6")] == ["v1", "v3"]
    assert not (tmp_path / "worker" / "6" / "v2").exists()
    keys = [o["Key"] for o in store_env.client().list_objects_v2(
        Bucket=BUCKET, Prefix="ls-sahi/d/projects/6/v2/").get("Contents", [])]  # fmt: skip
    assert keys == []


def test_the_cache_keeps_its_bound_and_never_drops_the_live_version(
    store_env: SeaweedS3, tmp_path: Path, redis_client: Any
) -> None:
    worker = _machine(tmp_path / "worker", store_env, redis_client, prefix="/e")
    for i in range(3):
        worker.publish("7", _write(bytes([i]) * 100_000), {"status": "accepted"})
    worker.set_live("7", "v1")
    server = Registry(
        tmp_path / "server", redis_client, ObjectStore(f"{store_env.url}/e"), cache_bytes=250_000
    )
    for name in ("v1", "v2", "v3"):
        server.local(server.get("7", name))
    cached = sorted(p.name for p in (tmp_path / "server" / "7").iterdir())
    assert cached == ["v1", "v3"], "v2, least recently used and not live, made room"


def test_with_the_store_down_the_cached_versions_are_listed_and_new_ones_cannot_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = SeaweedS3(tmp_path / "seaweed").start()
    try:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        worker = _machine(tmp_path / "worker", s3)
        worker.publish("8", _write(b"one"), {"status": "accepted"})
        worker.publish("8", _write(b"two"), {"status": "accepted"})
        server = _machine(tmp_path / "server", s3)
        server.local(server.get("8", "v1"))
        assert server.store is not None and server.store.ping()
    finally:
        s3.stop()
    assert not server.store.ping()
    assert [v.name for v in server.versions("8")] == ["v1"], "the cache, while the store is down"
    assert server.store_ok is False
    with pytest.raises(StoreUnavailable):
        server.store.pull("8", "v2", tmp_path / "server" / "8" / "v2")
    s3.start()  # the same ports and data
    try:
        assert [v.name for v in server.versions("8")] == ["v1", "v2"]
        assert server.store_ok is True
    finally:
        s3.stop()


def test_two_threads_downloading_one_version_both_get_it_and_one_copy_stays(
    store_env: SeaweedS3, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    worker = _machine(tmp_path / "worker", store_env, prefix="/f")
    worker.publish("9", _write(b"w" * 2_000_000), {"status": "accepted"})
    server = _machine(tmp_path / "server", store_env, prefix="/f")
    version = server.get("9", "v1")
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: server.local(version).path, range(2)))
    assert got[0] == got[1] and (got[0] / names.DETECTOR_DIR / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "server" / "9").iterdir()) == ["v1"]
