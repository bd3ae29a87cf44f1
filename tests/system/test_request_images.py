"""One /predict request's images: a repeated URL is fetched once, and all of them together
stay within MAX_REQUEST_PIXELS."""

from __future__ import annotations

import threading

from labelled_project import CONFIG
from PIL import Image

from label_studio_sahi.labelstudio.label_config import parse_label_config
from label_studio_sahi.serving.pipeline import Predictor
from label_studio_sahi.versions.bundles import ModelBundle
from testkit.servers import make_settings


def test_a_repeated_url_is_fetched_once_and_the_pixels_of_a_request_are_budgeted(
    bundle: ModelBundle,
) -> None:
    fetched: list[str] = []
    lock = threading.Lock()

    def load(url: str, task_id: int | None) -> Image.Image:
        with lock:
            fetched.append(url)
        return Image.new("RGB", (100, 100), "gray")  # 10,000 pixels each

    # Room for two of the three distinct images.
    predictor = Predictor(bundle, make_settings(max_request_pixels=25_000), load)
    urls = ["http://img/a.png"] * 4 + ["http://img/b.png", "http://img/c.png"] * 2
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(urls)]

    answers = predictor.predict_tasks(tasks, parse_label_config(CONFIG))
    predictor.close()

    assert sorted(fetched) == ["http://img/a.png", "http://img/b.png", "http://img/c.png"]
    failed = {urls[i] for i, a in enumerate(answers) if a.error is not None}
    assert len(failed) == 1  # the image that passed the budget, for every task that used it
    over = next(a.error for a in answers if a.error is not None)
    assert over.status == 413 and "MAX_REQUEST_PIXELS" in over.message
    assert all(a.error is None for u, a in zip(urls, answers, strict=True) if u not in failed)
