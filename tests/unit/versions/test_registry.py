"""Checkpoint versions: atomic publishing, live pointers, pruning, rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from label_studio_sahi.names import LIVE_CHANNEL
from label_studio_sahi.versions.registry import Registry, VersionNotFound


def _write(content: str) -> Any:
    def write(folder: Path) -> None:
        (folder / "detector").mkdir()
        (folder / "detector" / "weights.txt").write_text(content)

    return write


def test_versions_are_numbered_and_complete(tmp_path: Path, redis_client: Any) -> None:
    registry = Registry(tmp_path, redis_client)
    v1 = registry.publish("3", _write("a"), {"status": "accepted", "run_id": "r1"})
    v2 = registry.publish("3", _write("b"), {"status": "rejected", "run_id": "r2"})
    assert [v.name for v in registry.versions("3")] == ["v1", "v2"]
    assert (v1.model_version, v2.status) == ("p3-v1", "rejected")
    assert json.loads((v2.path / "meta.json").read_text())["created_at"]


def test_a_write_that_fails_leaves_no_version_and_no_temporary_folder(tmp_path: Path) -> None:
    registry = Registry(tmp_path)

    def broken(folder: Path) -> None:
        (folder / "detector").mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        registry.publish("3", broken, {})
    assert registry.versions("3") == []
    assert list((tmp_path / "3").iterdir()) == []


def test_a_folder_without_meta_is_never_listed(tmp_path: Path) -> None:
    (tmp_path / "3" / "v1").mkdir(
        parents=True
    )  # what a killed writer could leave if it renamed early
    (tmp_path / "3" / ".tmp-abc").mkdir()
    registry = Registry(tmp_path)
    assert registry.versions("3") == []
    registry.clean_temporary("3")
    assert not (tmp_path / "3" / ".tmp-abc").exists()


def test_live_pointer_is_announced_and_rollback_works(tmp_path: Path, redis_client: Any) -> None:
    registry = Registry(tmp_path, redis_client)
    registry.publish("3", _write("a"), {})
    registry.publish("3", _write("b"), {})
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(LIVE_CHANNEL)
    registry.set_live("3", "v2")
    assert registry.live("3") == "v2" and registry.live_projects() == {"3": "v2"}
    registry.set_live("3", "p3-v1")  # Label Studio's name works too
    assert registry.live("3") == "v1"
    registry.set_live("3", None)
    assert registry.live("3") is None
    messages: list[Any] = []
    for _ in range(20):
        if len(messages) == 3:
            break
        message = pubsub.get_message(timeout=0.5)
        if message:
            messages.append(json.loads(message["data"]))
    assert messages == [
        {"project": "3", "version": "v2"},
        {"project": "3", "version": "v1"},
        {"project": "3", "version": None},
    ]
    with pytest.raises(VersionNotFound):
        registry.set_live("3", "v9")


def test_prune_keeps_the_newest_and_the_live_one(tmp_path: Path, redis_client: Any) -> None:
    registry = Registry(tmp_path, redis_client)
    for i in range(5):
        registry.publish("3", _write(str(i)), {})
    registry.set_live("3", "v1")
    assert registry.prune("3", keep=2) == ["v2", "v3"]
    assert [v.name for v in registry.versions("3")] == ["v1", "v4", "v5"]


def test_rejected_versions_never_evict_rollback_targets(tmp_path: Path, redis_client: Any) -> None:
    registry = Registry(tmp_path, redis_client)
    for status in ["accepted", "accepted", "accepted", "rejected", "rejected", "rejected"]:
        registry.publish("3", _write(status), {"status": status})
    registry.set_live("3", "v3")
    assert registry.prune("3", keep=2) == ["v1", "v4"]
    kept = {v.name: v.status for v in registry.versions("3")}
    assert kept == {"v2": "accepted", "v3": "accepted", "v5": "rejected", "v6": "rejected"}


def test_a_full_disk_while_publishing_leaves_no_half_version(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.publish("3", _write("good"), {})

    def fills_the_disk(folder: Path) -> None:
        (folder / "detector").mkdir()
        (folder / "detector" / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        registry.publish("3", fills_the_disk, {})
    assert [v.name for v in registry.versions("3")] == ["v1"]
    assert sorted(p.name for p in (tmp_path / "3").iterdir()) == ["v1"]  # no temporary left


def test_a_lost_pointer_falls_back_to_the_newest_accepted_version(
    tmp_path: Path, redis_client: Any
) -> None:
    registry = Registry(tmp_path, redis_client)
    registry.publish("11", _write("a"), {"status": "accepted"})
    registry.publish("11", _write("b"), {"status": "accepted"})
    registry.publish("11", _write("c"), {"status": "rejected"})
    registry.publish("12", _write("d"), {"status": "rejected"})
    registry.set_live("11", "v1")
    assert registry.live("11") == "v1"
    redis_client.delete("ls-sahi:live:11")  # what a new or flushed Redis holds
    assert registry.live("11") == "v2", "the newest accepted, never a rejected one"
    assert registry.live("12") is None, "nothing accepted: the base models"
    assert registry.live_projects() == {"11": "v2"}
    registry.set_live("11", None)  # a rollback to base is kept as such
    assert registry.live("11") is None and registry.live_projects() == {}
