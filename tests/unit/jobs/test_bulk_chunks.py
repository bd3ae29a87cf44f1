"""A bulk run's arithmetic: its tasks in chunks, and its chunks' progress added up."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from rq import Queue

from label_studio_sahi import names
from label_studio_sahi.jobs.bulk import BASE, ChunkState, add_up, enqueue_bulk, split_tasks
from testkit.servers import make_settings

PLANNED = {"run": "abc", "version": "v2", "model_version": "p7-v2", "total": 10, "unqueued": 2}


def _chunk(status: str, **meta: object) -> ChunkState:
    return ChunkState(status, dict(meta), "StudioError: HTTP 503" if status == "failed" else None)


def test_tasks_split_into_chunks_of_the_setting_in_order_the_last_one_shorter() -> None:
    tasks = list(range(130))
    chunks = split_tasks(tasks, 50)
    assert [len(c) for c in chunks] == [50, 50, 30]
    assert [t for c in chunks for t in c] == tasks


def test_a_project_smaller_than_a_chunk_is_one_chunk_and_an_empty_one_none() -> None:
    assert split_tasks([1, 2, 3], 50) == [[1, 2, 3]]
    assert split_tasks([], 50) == []


def test_a_chunk_holds_at_least_one_task() -> None:
    with pytest.raises(ValueError, match="at least 1 task"):
        split_tasks([1], 0)


def test_progress_adds_up_the_chunks_and_the_tasks_the_planner_skipped() -> None:
    chunks = [
        _chunk("finished", done=3, predicted=2, failed=1, written={1: "w0", 2: "w0"}),
        _chunk("started", done=1, predicted=1, written={4: "w1"}),
        _chunk("queued"),
    ]
    state = add_up("7", PLANNED, chunks)
    assert state["status"] == "started"
    assert (state["done"], state["total"]) == (3 + 1 + 2, 10)
    assert (state["predicted"], state["failed"], state["skipped"]) == (3, 1, 2)
    assert state["chunks"] == {"total": 3, "waiting": 1, "running": 1, "finished": 1, "failed": 0}
    assert state["workers"] == {"w0": 2, "w1": 1}
    assert "result" not in state and state["model_version"] == "p7-v2"


def test_a_chunk_waiting_for_its_retry_keeps_the_run_going() -> None:
    chunks = [_chunk("finished", done=4, predicted=4), _chunk("scheduled", done=2, predicted=2)]
    assert add_up("7", PLANNED, chunks)["status"] == "started"


def test_a_run_whose_chunks_all_finished_has_the_result_of_a_single_job() -> None:
    chunks = [
        _chunk("finished", done=4, predicted=4, model_version="p7-v2"),
        _chunk("finished", done=4, predicted=3, skipped=1, model_version="p7-v2"),
    ]
    state = add_up("7", PLANNED, chunks)
    assert state["status"] == "finished" and state["done"] == state["total"] == 10
    assert state["result"] == {
        "project": "7",
        "model_version": "p7-v2",
        "predicted": 7,
        "failed": 0,
        "skipped": 3,
        "total": 10,
    }


def test_the_base_models_version_comes_from_the_chunks_that_loaded_them() -> None:
    planned = {**PLANNED, "version": "base", "model_version": None, "unqueued": 0, "total": 2}
    chunks = [_chunk("finished", done=2, predicted=2, model_version="tiny@1234abcd")]
    assert add_up("7", planned, chunks)["result"]["model_version"] == "tiny@1234abcd"


def test_a_chunk_failed_for_good_fails_the_run_once_the_others_ended_and_says_why() -> None:
    chunks = [_chunk("finished", done=4, predicted=4), _chunk("failed", done=1, predicted=1)]
    state = add_up("7", PLANNED, chunks)
    assert state["status"] == "failed" and "result" not in state
    assert state["error"].startswith("1 of 2 chunks failed") and "HTTP 503" in state["error"]
    running = [_chunk("failed"), _chunk("started")]
    assert add_up("7", PLANNED, running)["status"] == "started"


def test_a_run_with_nothing_to_predict_is_finished() -> None:
    state = add_up("7", {**PLANNED, "total": 2, "unqueued": 2}, [])
    assert state["status"] == "finished" and state["result"]["skipped"] == 2


def test_the_chunk_job_path_resolves_to_the_function_rq_will_import() -> None:
    module_name, _, attribute = names.BULK_CHUNK_JOB.rpartition(".")
    function = getattr(importlib.import_module(module_name), attribute)
    assert f"{function.__module__}.{function.__qualname__}" == names.BULK_CHUNK_JOB


def test_chunk_ids_are_valid_rq_ids_and_never_another_projects_job_id() -> None:
    ids = {
        names.bulk_chunk_job_id(p, "0a1b2c3d4e5f", i)
        for p in ("1", "1-2", "x_y")
        for i in (0, 1, 12)
    }
    assert len(ids) == 9 and all(":" not in i for i in ids)
    others = {names.bulk_job_id(p) for p in ("1", "1-2", "bulk-1-0a1b2c3d4e5f-0")}
    others |= {names.train_job_id(p) for p in ("1", "1-2")}
    assert not ids & others


def test_a_request_pins_the_live_version_and_a_second_one_reuses_the_waiting_run(
    redis_client: Any,
) -> None:
    settings = make_settings()
    redis_client.set(names.LIVE_KEY.format(project="7"), "v3")  # what a promotion writes
    first = enqueue_bulk(redis_client, settings, "7")
    redis_client.set(names.LIVE_KEY.format(project="7"), "v4")
    again = enqueue_bulk(redis_client, settings, "7", only_missing=False)
    assert again.id == first.id == names.bulk_job_id("7")
    assert again.args == ("7", True, "v3")  # the first request's version and choice
    assert Queue(settings.predict_queue, connection=redis_client).job_ids == [first.id]
    assert enqueue_bulk(redis_client, settings, "8").args == ("8", True, BASE)
