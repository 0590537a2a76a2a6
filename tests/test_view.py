"""`lensgraph view` in a real browser: Netron draws the processed graph, and a rewritten node's
properties say which pass changed it and how; the model's properties show the pipeline.

Needs Debian's chromium and Playwright for Python (driving that browser, never one it downloads).
Where they are missing the test is skipped, unless LENSGRAPH_REQUIRE_BROWSER=1 (as in CI).
A screenshot is saved under LENSGRAPH_ARTIFACTS (default: test-artifacts/ in the repository).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from lensgraph.pipeline import DEFAULT_PIPELINE
from lensgraph.process import process

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
REWRITTEN = "/model/transformer/h.0/ln_1/LayerNormalization"  # a LayerNorm that ln_to_rms replaced
ARTIFACTS = os.environ.get("LENSGRAPH_ARTIFACTS",
                           os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts"))


def _browser_or_skip():
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (PyPI)")
    try:
        import netron  # noqa: F401
    except ImportError:
        missing.append("netron (the [view] extra)")
    if missing:
        message = "needs " + ", ".join(missing)
        if os.environ.get("LENSGRAPH_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def served(gpt2_exports, tmp_path):
    """A processed GPT-2 (with ln_to_rms) served by `lensgraph view`; yields its address."""
    model = tmp_path / "gpt2.lens.onnx"
    process(gpt2_exports["torchscript17"], model, passes=list(DEFAULT_PIPELINE) + ["ln_to_rms"])
    lensgraph = os.path.join(os.path.dirname(sys.executable), "lensgraph")
    proc = subprocess.Popen([lensgraph, "view", str(model), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, f"no address printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield found.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_view_shows_rewritten_nodes_in_netron(served):
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(served)
            page.get_by_role("button", name="Accept").click(timeout=60_000)  # Netron's first-visit notice
            page.wait_for_selector("body.default", timeout=120_000)  # the graph view, not the welcome page
            page.wait_for_selector("#canvas g.node[transform]", timeout=120_000)  # nodes laid out and drawn
            node = page.locator(f'[id="node-name-{REWRITTEN}"]')
            assert node.count() == 1, "the rewritten node keeps its original name"
            node.click()
            sidebar = page.locator("#sidebar")
            deadline = time.time() + 30
            while "ln_to_rms" not in sidebar.inner_text() and time.time() < deadline:
                time.sleep(0.2)
            text = sidebar.inner_text()
            assert REWRITTEN in text
            assert "METADATA" in text and "ln_to_rms" in text  # the lensgraph.pass entry
            assert "x / sqrt(mean(x^2) + eps)" in text
            page.screenshot(path=os.path.join(ARTIFACTS, "netron-rewritten-node.png"))
            page.locator("#sidebar-model-button").click()
            deadline = time.time() + 30
            pipeline = ",".join(list(DEFAULT_PIPELINE) + ["ln_to_rms"])
            while pipeline not in sidebar.inner_text() and time.time() < deadline:
                time.sleep(0.2)
            text = sidebar.inner_text()
            assert "MODEL PROPERTIES" in text.upper() and pipeline in text, text
            page.screenshot(path=os.path.join(ARTIFACTS, "netron-model-properties.png"))
        finally:
            browser.close()
    assert os.path.getsize(os.path.join(ARTIFACTS, "netron-rewritten-node.png")) > 10_000
