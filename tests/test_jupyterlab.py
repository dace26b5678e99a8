"""The interactive path as a person takes it: JupyterLab 4 serves a notebook with an explorer (01's eps slider, 03's
noise slider, 04's sigma sliders), a headless Chromium opens it, runs every cell from the Run menu, moves the slider,
and the explorer's figure is redrawn.

A separate check (`pytest -m browser -n 0`; 04 alone took 243 s and 262 s in two runs on 2 cores, each notebook costs
about its own run time): it needs Chromium from the system's packages (Debian: `apt-get install chromium`) and
Playwright (`pip install playwright`; its own browser download is not used). Skipped without them. Screenshots before
and after the slider move go to `results/jupyterlab/`. CI does not run it: the three notebooks run for about 10
minutes of the machine, twice the 5 minutes the browser check may add to CI, and the Chromium install comes on top.

It waits on states that stay once reached, never on a passing one: an earlier version waited for the kernel's Busy
light after Run All Cells and failed on a fresh machine when that light was missed. Now every cell starts without
a prompt number and the check waits until none is queued and they all have one.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cliplab.cli.reproduce import thread_environment

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


# Every cell attached to the page (JupyterLab 4 may leave cells out of view out of the DOM), so that each cell's
# prompt can be read; and no question about Jupyter news over the screenshots.
LAB_SETTINGS = {"notebook-extension/tracker": {"windowingMode": "none"},
                "apputils-extension/notification": {"fetchNews": "false"}}
# A cell's prompt: "[ ]:" before it runs, "[*]:" while it waits or runs, "[7]:" once it ran. Run All Cells queues
# every cell at once, and a cell's error sends the cells after it back to "[ ]:".
PROMPTS = "[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim())"
RUN_ENDED = f"() => {{ const p = {PROMPTS}; return p.some(t => /^\\[\\d+\\]:$/.test(t)) && !p.includes('[*]:'); }}"


# each explorer: its notebook, the slider's description, and the move a person makes: a value typed into the
# readout and the readout shown after it, or None for one step right with the keyboard (a selection slider's readout
# cannot be typed into)
EXPLORERS = {"01_attacks": ("eps", None, None), "03_randomized_smoothing": ("noise σ", "0.2", "0.20"),
             "04_denoising": ("spatial σ", "3.0", "3.00")}


@pytest.fixture
def jupyterlab(tmp_path, request):
    """JupyterLab on a copy of the notebook ``request.param`` without its outputs: running it in the browser must not
    touch the committed notebook, and a cell that ran shows a prompt number it cannot have had before."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _copy_without_outputs(ROOT / "notebooks" / f"{request.param}.ipynb", notebooks / f"{request.param}.ipynb")
    settings = tmp_path / "lab-settings"
    for name, values in LAB_SETTINGS.items():
        path = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(values))
    port = _free_port()
    env = {**os.environ, "CLIPLAB_PROFILE": "shapes", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
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
@pytest.mark.parametrize("jupyterlab", list(EXPLORERS), indirect=True)
def test_moving_an_explorers_slider_redraws_its_figure(jupyterlab, request):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright (pip install playwright)")
    name = request.node.callspec.params["jupyterlab"]
    description, typed, shown = EXPLORERS[name]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{jupyterlab}/lab/tree/{name}.ipynb?token={TOKEN}")
        page.locator(".jp-Notebook").wait_for(timeout=60_000)
        _wait_for_idle_kernel(page, timeout_s=60)

        page.locator(".jp-Notebook").click()  # the notebook, not the file browser, is what the Run menu acts on
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        # Wait for the run's end state, not for the kernel's Busy light, which can come and go between two polls.
        page.wait_for_function(RUN_ENDED, timeout=900_000, polling=1000)  # 4-6 minutes on 2 cores
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        assert not errors.filter(has_text="Error").count(), errors.all_inner_texts()
        prompts = page.evaluate(f"() => {PROMPTS}")
        assert all(prompt[1:-2].isdigit() for prompt in prompts), f"every cell ran: {prompts}"
        _wait_for_idle_kernel(page, timeout_s=60)
        slider = page.locator(".widget-hslider").filter(has_text=description)
        explorer = page.locator(".jp-Cell").filter(has=slider)  # the widget cell, wherever it sits in the notebook
        figure = explorer.locator(".jp-OutputArea-output img")
        assert slider.count() == 1 and explorer.count() == 1 and figure.count() == 1, "one slider, one figure"
        before = figure.get_attribute("src")
        slider.scroll_into_view_if_needed()
        page.screenshot(path=SCREENSHOTS / f"{name}_slider_before.png")

        readout = slider.locator(".widget-readout")
        start = readout.inner_text().strip()
        if typed is None:  # one step right, as the arrow key moves it
            slider.locator(".noUi-handle").focus()
            page.keyboard.press("ArrowRight")
        else:
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type(typed)
            page.keyboard.press("Enter")
        # the explorer's output is redrawn, its <img> replaced: look it up afresh until its source changes
        deadline = time.monotonic() + 120
        while figure.get_attribute("src") == before and time.monotonic() < deadline:
            time.sleep(0.5)
        _wait_for_idle_kernel(page, timeout_s=120)
        assert readout.inner_text().strip() == (shown or readout.inner_text().strip()) != start
        after = figure.get_attribute("src")
        page.screenshot(path=SCREENSHOTS / f"{name}_slider_after.png")
        browser.close()
    assert after != before, f"moving {name}'s {description} slider must redraw its figure"


def _copy_without_outputs(source: Path, target: Path) -> None:
    notebook = json.loads(source.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    target.write_text(json.dumps(notebook))


def _wait_for_idle_kernel(page, timeout_s: float) -> None:
    """The kernel status in JupyterLab's toolbar reads Idle (it says Busy while a cell runs)."""
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=timeout_s * 1000)
