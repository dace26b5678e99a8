"""The interactive path as a person takes it: JupyterLab 4 serves notebook 04, a headless Chromium opens it, runs
every cell from the Run menu, moves the spatial-sigma slider, and the denoised figure changes.

A separate check (`pytest -m browser`, about 5 minutes on 2 cores): it needs Chromium from the system's packages
(Debian: `apt-get install chromium`) and Playwright (`pip install playwright`; its own browser download is not
used). Skipped without them. Screenshots before and after the slider move go to `results/jupyterlab/`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cliplab.runner import thread_environment

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = ROOT / "results" / "jupyterlab"
TOKEN = "cliplab-browser-check"
# without the background-networking flags Chromium keeps trying to reach Google's hosts on a closed network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a copy of the notebooks (running them in the browser must not touch the committed outputs)."""
    notebooks = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    port = _free_port()
    env = {**os.environ, "CLIPLAB_PROFILE": "shapes", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           **thread_environment(len(os.sched_getaffinity(0)))}  # the kernel alone on the machine, as for a person
    env.pop("CLIPLAB_FIGURES", None)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={notebooks}", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within a minute")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium from the system's packages (apt-get install chromium)")
def test_notebook_04_slider_changes_the_figure(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright (pip install playwright)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{jupyterlab}/lab/tree/04_denoising.ipynb?token={TOKEN}")
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        _wait_for_idle_kernel(page, timeout_s=60)

        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='busy']").wait_for(timeout=30_000)
        _wait_for_idle_kernel(page, timeout_s=900)  # every cell ran (4 minutes on 2 quiet cores)
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        assert not errors.filter(has_text="Error").count(), errors.all_inner_texts()
        slider = page.locator(".widget-hslider").filter(has_text="spatial σ")
        figure = page.locator(".jp-OutputArea-output img").last  # the interactive figure, in the last cell
        assert slider.count() == 1 and figure.count() == 1
        assert page.locator(".jp-Cell").last.locator(".jp-OutputArea-output img").count() == 1, "one figure"
        before = figure.get_attribute("src")
        _dismiss_news_prompt(page)
        slider.scroll_into_view_if_needed()
        page.screenshot(path=SCREENSHOTS / "04_slider_before.png")

        readout = slider.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type("3.0")
        page.keyboard.press("Enter")
        # the slider's output is redrawn, its <img> replaced: look the last one up afresh
        page.wait_for_function("""before => {
            const images = document.querySelectorAll('.jp-OutputArea-output img');
            return images.length && images[images.length - 1].src !== before;
        }""", arg=before, timeout=120_000)
        _wait_for_idle_kernel(page, timeout_s=120)
        assert readout.inner_text().strip() == "3.00"
        after = page.locator(".jp-OutputArea-output img").last.get_attribute("src")
        page.screenshot(path=SCREENSHOTS / "04_slider_after.png")
        browser.close()
    assert after != before, "moving the spatial-sigma slider must redraw the denoised images"


def _dismiss_news_prompt(page) -> None:
    """JupyterLab asks once whether to fetch Jupyter news; the answer keeps it out of the screenshots."""
    no = page.get_by_role("button", name="No", exact=True)
    if no.count():
        no.click()


def _wait_for_idle_kernel(page, timeout_s: float) -> None:
    """The kernel status in JupyterLab's toolbar reads Idle (it says Busy while a cell runs)."""
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=timeout_s * 1000)
