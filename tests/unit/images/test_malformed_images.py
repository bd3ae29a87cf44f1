"""No image file can crash a process: a corpus of malformed files (tests/malformed_images.py)
through both decoders in a child process, then the worst of them through a real server, a
bulk job and a training job on real rq workers.

A decoder crash (torchvision's libpng died with SIGSEGV on a PNG whose IDAT is shorter than
its IHDR says) kills the child, which the parent records against the file and replaces, so
the crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from labelled_project import CONFIG, labelled_project
from malformed_images import REFUSED, corpus, digest, short_idat_png
from PIL import Image
from stack import Stack, job_done, stack_settings, start_stack, start_worker, wait_for

from label_studio_sahi.errors import ImageTooLarge
from label_studio_sahi.images import decode as decoding
from label_studio_sahi.images.fetch import ImageLoader
from label_studio_sahi.jobs.trigger import TrainingTrigger
from label_studio_sahi.serving.pipeline import RequestImages
from label_studio_sahi.serving.routes import create_app
from label_studio_sahi.serving.state import Service
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.fake_studio import FakeStudio
from testkit.servers import make_settings, start_uvicorn, stop_uvicorn
from testkit.tiny_models import random_detr

TESTS = Path(__file__).resolve().parents[2]  # the corpus script, tests/malformed_images.py


class DecodeChild:
    """A long-lived child decoding files in a loop (``malformed_images.serve_decodes``);
    ``decode`` answers None when the child died on the file, and starts a new one."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._process = self._start()
        self.deaths: list[str] = []

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(TESTS / "malformed_images.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log.open("ab"),
            cwd=TESTS,
        )

    def decode(self, name: str, data: bytes) -> dict[str, dict[str, str]] | None:
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write(len(data).to_bytes(4, "big") + data)
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = b""
        if line:
            answer: dict[str, dict[str, str]] = json.loads(line)
            return answer
        code = process.wait(timeout=30)
        self.deaths.append(f"{name}: the decoding process died (exit {code})")
        self._process = self._start()
        return None

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=30)


@pytest.fixture(scope="module")
def cases() -> list[tuple[str, bytes, Any]]:
    return corpus(seed=0)


def test_the_corpus_has_over_200_files_of_every_kind(cases: list[tuple[str, bytes, Any]]) -> None:
    names = [name for name, _, _ in cases]
    assert len(names) >= 200
    for prefix in ("png-", "jpeg-", "gif-", "webp-", "tiff-", "bmp", "not-allowed-"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert sum(expected is not REFUSED for _, _, expected in cases) >= 20  # decodable ones


def test_no_file_crashes_a_decoder_each_is_refused_by_name_or_decoded_right(
    cases: list[tuple[str, bytes, Any]], tmp_path: Path
) -> None:
    child = DecodeChild(tmp_path / "child.log")
    wrong: list[str] = []
    try:
        for name, data, expected in cases:
            answer = child.decode(name, data)
            if answer is None:
                continue
            for decoder, got in answer.items():
                where = f"{name} ({decoder})"
                if "raised" in got:
                    wrong.append(f"{where}: not an ImageError: {got['raised']}")
                elif isinstance(expected, str):
                    if "refused" not in got:
                        wrong.append(f"{where}: decoded, should be refused")
                    elif not got["message"]:
                        wrong.append(f"{where}: refused without a message")
                    elif name.startswith("not-allowed-ico") and "not allowed" not in got["message"]:
                        wrong.append(f"{where}: {got['message']!r} does not say 'not allowed'")
                elif "refused" in got:
                    wrong.append(f"{where}: refused ({got['message']}), should decode")
                elif got["pixels"] != digest(expected):
                    wrong.append(f"{where}: wrong pixels {got['pixels']}")
    finally:
        child.close()
    assert not child.deaths, "\n".join(child.deaths)
    assert not wrong, "\n".join(wrong)


def test_refusals_name_the_problem() -> None:
    from label_studio_sahi.errors import ImageFormatError
    from label_studio_sahi.images.fetch import decode_pixels

    with pytest.raises(ImageFormatError) as err:
        decode_pixels(short_idat_png(64, 64, 4), make_settings())
    assert err.value.message == (
        "the PNG is truncated: IDAT holds 772 of 12,352 bytes the 64x64 header needs"
    )
    photo = io.BytesIO()
    Image.effect_noise((200, 150), 60).convert("RGB").save(photo, "JPEG")
    data = photo.getvalue()
    with pytest.raises(ImageFormatError) as err:
        decode_pixels(data[: len(data) // 2] + b"\xff\xd9", make_settings())
    assert err.value.message.startswith("the JPEG is truncated: its scan data stops early")


# --- the request budget, charged from the header ------------------------------------------


def _png_file(path: Path, size: tuple[int, int]) -> None:
    Image.new("RGB", size, "gray").save(path, "PNG")  # flat: a 9 MP file of a few KB


def test_images_over_the_request_budget_are_refused_before_any_pixel_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        _png_file(tmp_path / f"big{i}.png", (3000, 3000))
    _png_file(tmp_path / "small.png", (400, 300))
    decoded: list[int] = []
    real_decode = decoding.decode_pixels

    def counted(data: bytes, settings: Any) -> np.ndarray:
        pixels = real_decode(data, settings)
        decoded.append(pixels.shape[0] * pixels.shape[1])
        return pixels

    monkeypatch.setattr(decoding, "decode_pixels", counted)
    settings = make_settings(local_files_document_root=tmp_path, max_request_pixels=1_000_000)
    with ImageLoader(settings) as loader:
        budget = RequestImages(loader.load_encoded, settings.max_request_pixels)
        for i in range(4):
            with pytest.raises(ImageTooLarge) as err:
                budget(f"/data/local-files/?d=big{i}.png", i)
            assert "MAX_REQUEST_PIXELS (1,000,000 pixels in all)" in err.value.message
        assert decoded == []  # not one of the 9 MP images was decoded
        assert budget("/data/local-files/?d=small.png", 9).shape == (300, 400, 3)
    assert decoded == [120_000]


# --- through a real server ------------------------------------------------------------------


def _worst_files() -> dict[str, bytes]:
    cut = io.BytesIO()
    Image.effect_noise((160, 120), 60).convert("RGB").save(cut, "JPEG")
    jpeg = cut.getvalue()
    broken_crc = bytearray(short_idat_png(64, 64, 64))
    broken_crc[-13] ^= 1  # the IDAT chunk's CRC
    return {
        "short64.png": short_idat_png(64, 64, 4),
        "short512.png": short_idat_png(512, 512, 4),
        "short3000.png": short_idat_png(3000, 3000, 4),
        "cut-eoi.jpg": jpeg[: len(jpeg) // 2] + b"\xff\xd9",
        "cut.jpg": jpeg[: len(jpeg) // 2],
        "crc.png": bytes(broken_crc),
    }


def _good_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (160, 120), "gray").save(out, "PNG")
    return out.getvalue()


def test_a_real_server_names_each_bad_image_answers_the_good_one_and_stays_up(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    bad = _worst_files()
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "good.png").write_bytes(_good_png())
    settings = make_settings(local_files_document_root=tmp_path)
    live = start_uvicorn(create_app(settings, Service(settings, bundle)))
    try:
        names = [*bad, "good.png"]
        tasks = [
            {"id": i, "data": {"image": f"/data/local-files/?d={name}"}}
            for i, name in enumerate(names)
        ]
        answer = httpx.post(
            f"{live.url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        errors = {e["task"]: e for e in body["errors"]}
        for i, name in enumerate(names[:-1]):
            assert errors[i]["status_code"] == 415 and errors[i]["error"] == "unsupported_image"
            assert "truncated" in errors[i]["detail"] or "corrupt" in errors[i]["detail"], name
        assert len(names) - 1 not in errors
        assert "error" not in body["results"][-1]
        assert httpx.get(f"{live.url}/health").status_code == 200
    finally:
        stop_uvicorn(live)


# --- through a bulk job and a training job on real rq workers --------------------------------


@pytest.fixture
def fake() -> Iterator[FakeStudio]:
    with FakeStudio() as studio:
        yield studio


def _add_bad_tasks(fake: FakeStudio, project_id: int, annotate_like: int | None) -> list[int]:
    ids = []
    for name, data in _worst_files().items():
        task = fake.add_task(project_id, {"image": fake.upload(project_id, name, data)})
        if annotate_like is not None:
            fake.add_annotation(task, fake.tasks[annotate_like]["annotations"][0]["result"])
        ids.append(task)
    return ids


@pytest.mark.slow
def test_a_bulk_job_reports_bad_images_and_its_worker_survives(
    fake: FakeStudio, redis_url: str, redis_client: Any, tmp_path: Path, detector_dir: Path
) -> None:
    project = labelled_project(fake, n_tasks=2)
    bad = _add_bad_tasks(fake, project.id, None)
    stack: Stack = start_stack(
        stack_settings(fake, redis_url, detector_dir, tmp_path / "models"), tmp_path
    )
    try:
        assert stack.post("/bulk-predict", {"project": project.id}).status_code == 202

        def finished() -> Any:
            answer = httpx.get(f"{stack.server.url}/bulk-predict/{project.id}").json()
            return answer if answer["status"] in ("finished", "failed") else None

        progress = wait_for(finished, 180, "the bulk prediction job", every=0.5)
        log = stack.workers[0].log.read_text()[-3000:]
        assert progress["status"] == "finished", log
        assert progress["result"]["failed"] == len(bad), progress
        assert progress["result"]["predicted"] == 2, progress
        assert stack.workers[0].process.poll() is None, log  # the worker is alive
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_training_job_skips_bad_images_and_its_worker_survives(
    fake: FakeStudio, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    project = labelled_project(fake, n_tasks=6)
    bad = _add_bad_tasks(fake, project.id, project.task_ids[0])
    settings = stack_settings(
        fake, redis_url, random_detr(tmp_path / "untrained"), tmp_path / "models", train_steps=5
    )
    worker = start_worker(settings, tmp_path, "trainer")
    try:
        job = TrainingTrigger(redis_client, settings).enqueue(str(project.id), "test", delay=0)
        wait_for(lambda: job_done(job, [worker]), 300, "the training job", every=1)
        assert job.get_status(refresh=True) == "finished", worker.log.read_text()[-3000:]
        dataset = job.return_value()["dataset"]
        assert dataset["unreadable_tasks"] == len(bad)
        assert dataset["train_tasks"] + dataset["heldout_tasks"] == 6
        assert job.retries_left in (None, settings.job_retries)  # not retried: it succeeded
        assert worker.process.poll() is None
    finally:
        worker.stop()
