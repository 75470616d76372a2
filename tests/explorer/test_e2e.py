"""The explorer in a real browser: start the server, analyse a prompt, click a latent.

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install -y chromium`) and the
`playwright` Python package, which drives it; Playwright never downloads a browser here.
Without them the test is skipped, except in CI (the CI variable set), where it fails.
The screenshot goes to `out/test-artifacts/explorer.png` (or $MLSAE_TEST_ARTIFACTS).
"""

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from mlsae.explorer import create_app
from mlsae.model.lightning import MLSAETransformer
from tests.explorer.conftest import PROMPT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("MLSAE_TEST_ARTIFACTS", "out/test-artifacts"))
TIMEOUT_MS = 60_000


def require_browser() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing and not os.environ.get("CI"):
        pytest.skip("needs " + " and ".join(missing))
    assert not missing, "CI must provide " + " and ".join(missing)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server_url(model: MLSAETransformer, examples_db: Path) -> Iterator[str]:
    app = create_app(model, examples_db, repo_id="tiny-gpt-neox")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


def test_analyse_a_prompt_and_open_a_latent(server_url: str, tmp_path: Path) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server_url)
            page.wait_for_function(
                "document.getElementById('model-summary').textContent.includes('latents')"
            )

            page.fill("#prompt", PROMPT)
            page.click("#analyse")
            page.wait_for_selector("#heatmap td.cell")
            n_tokens = page.locator("#tokens .tok").count()
            assert page.locator("#heatmap td.cell").count() == 4 * n_tokens
            assert page.locator("#heatmap td.cell:not([data-value='0.0000'])").count() > 0

            firing = page.locator("#heatmap td.cell:not([data-value='0.0000'])").last
            firing.click()
            chip = page.locator("#cell-latents .latent-chip").first
            chip.wait_for()
            latent = chip.get_attribute("data-latent")
            chip.click()

            page.wait_for_selector("#examples details[open] .example")
            assert page.locator("#latent-title").inner_text() == f"Latent #{latent}"
            assert page.locator("#examples details").count() == 4
            page.wait_for_selector("#logits [data-panel=steering] table")
            page.wait_for_selector("#histograms figure svg")
            page.wait_for_selector("#metrics tbody tr")

            screenshot = tmp_path / "explorer.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert not errors, errors
    assert screenshot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "explorer.png")
