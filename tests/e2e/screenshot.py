"""A screenshot of Label Studio's labeling page, in Debian's headless Chromium driven by
Playwright's core (the ``playwright`` wheel's driver; no browser download)."""

from __future__ import annotations

import shutil
from pathlib import Path

from e2e.studio_server import StudioServer

# Without the background-networking flags Chromium keeps dialling out of a closed network.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot_task(studio: StudioServer, project: int, task: int, out: Path) -> Path:
    """Log in as the admin, open ``task`` in the labeling UI, and save a PNG to ``out``."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None:
        raise RuntimeError("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"{studio.url}/user/login/")
            page.fill("input[name=email]", studio.email)
            page.fill("input[name=password]", studio.password)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{studio.url}/projects/{project}/data?tab=0&task={task}")
            page.wait_for_load_state("networkidle")
            # The labeling UI draws the image and the predicted regions on canvases.
            page.wait_for_selector("canvas", timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    return out
