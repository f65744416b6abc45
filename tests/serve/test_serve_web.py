"""The web chat page at `/`, driven in a real headless Chromium (Debian's `chromium` package) through
Playwright: a question typed, the answer streamed into the page, the stages shown live, an answer
stopped (its session freed on the stages), and a screenshot.

Needs `/usr/bin/chromium` (apt-get install chromium) and the `playwright` package (the [test]
extra; its own browser download is not used). Skipped with the reason where either is missing.
Set DAIR_WEB_SCREENSHOT=PATH to keep the screenshot (docs/web.png was made that way).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from support.serve_fixtures import KEY, serve_process

from dair.bus.client import BusClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed (apt-get install chromium)")
ALL_STAGES_UP = "document.querySelectorAll('#nodes .node :is(.state-ready, .state-busy)').length === 3"
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the [test] extra")


@pytest.fixture(scope="module")
def page_url(cluster3, default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve_process(cluster3.addr, default_model, tmp_path_factory.mktemp("serve-web")) as url:
        yield url


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, url: str):
    pg = browser.new_page(viewport={"width": 1100, "height": 640})
    pg.goto(url)
    pg.fill("#key", KEY)
    pg.dispatch_event("#key", "change")
    pg.wait_for_function(ALL_STAGES_UP, timeout=30_000)
    return pg


def test_page_streams_an_answer_and_shows_the_stages(browser, page_url: str, tmp_path: Path) -> None:
    # Greedy and bounded (settings in the address), so that the test's time does not depend on a draw.
    page = _open(browser, page_url + "/?temperature=0&max_tokens=40")
    # The cluster panel lists the three stages with their layers, ready.
    panel = page.inner_text("#nodes")
    for layers in ("0–9", "10–19", "20–29"):
        assert f"layers {layers}" in panel
    # Count how often the answer's text changes: a streamed answer grows in several steps.
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    done = page.wait_for_selector(".msg.assistant:not([data-state='streaming'])", timeout=120_000)
    state = done.get_attribute("data-state")
    assert state in ("stop", "length"), done.inner_text()
    answer = done.inner_text()
    assert answer.strip() and "tokens in" in answer
    assert page.evaluate("window.updates") > 3, "the answer should arrive in pieces"
    # The conversation is kept: a second turn shows both questions and both answers.
    page.fill("#prompt", "And of Italy?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll(\".msg.assistant:not([data-state='streaming'])\").length === 2",
                           timeout=120_000)
    assert len(page.query_selector_all(".msg.user")) == 2
    shot = Path(os.environ.get("DAIR_WEB_SCREENSHOT") or tmp_path / "web.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_stop_button_ends_the_answer_and_frees_the_session(browser, page_url: str, cluster3) -> None:
    page = _open(browser, page_url + "/?max_tokens=1500")
    page.fill("#prompt", "Write a very long story about a dragon and a knight.")
    page.press("#prompt", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant') || {}).textContent?.length > 20",
                           timeout=120_000)
    page.click("#stop")
    done = page.wait_for_selector(".msg.assistant[data-state='stopped']", timeout=30_000)
    assert "stopped" in done.inner_text()
    deadline = time.monotonic() + 20
    while True:
        with BusClient(cluster3.addr, timeout=10) as bc:
            st = bc.status()
        held = [n["sessions"] for n in st["nodes"] if n["state"] != "dead"]
        if not st["sessions"] and not any(held):
            break
        assert time.monotonic() < deadline, ("the stopped answer's session is still open", held, st["sessions"])
        time.sleep(0.3)
    assert not page.is_disabled("#send")
