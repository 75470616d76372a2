"""The explorer in a real browser: the page opens on the model's top example, analyses the
prompt its address names, follows the history, and shows a latent and the histograms.

Needs Debian's Chromium at /usr/bin/chromium (`apt-get install -y chromium`) and the
`playwright` Python package, which drives it; Playwright never downloads a browser here.
Without them the tests are skipped, except in CI (the CI variable set), where they fail.
The screenshot goes to `out/test-artifacts/explorer.png` (or $MLSAE_TEST_ARTIFACTS).
"""

import os
import shutil
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from mlsae.explorer import create_app
from mlsae.model.lightning import MLSAETransformer
from tests.explorer.conftest import PROMPT, top_example

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
OTHER_PROMPT = "A dog ran in the park and the cat watched."


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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A page that fails the test on any script error."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.close()
    assert not errors, errors


def prompt_address(server_url: str, prompt: str) -> str:
    return server_url + "#prompt=" + urllib.parse.quote(prompt, safe="")


def wait_for_prompt(page, prompt: str) -> None:
    """Wait until the page shows `prompt`'s tokens and its heatmap."""
    page.wait_for_function(
        """(prompt) => [...document.querySelectorAll('#tokens .tok')]
            .map((node) => node.title.includes('special') ? '' : node.textContent)
            .join('').replaceAll('↵', '\\n') === prompt
          && document.querySelectorAll('#heatmap td.cell').length > 0""",
        arg=prompt,
    )


def address_prompt(page) -> str | None:
    fragment = urllib.parse.urlsplit(page.url).fragment
    if not fragment:
        return None
    assert fragment.startswith("prompt="), page.url
    return urllib.parse.unquote(fragment.removeprefix("prompt="))


def test_the_page_opens_on_the_top_example_with_its_latent(
    page, server_url: str, model: MLSAETransformer, examples_db: Path
) -> None:
    expected = top_example(model, examples_db)
    page.goto(server_url)
    wait_for_prompt(page, expected.text)
    assert page.input_value("#prompt") == expected.text
    page.wait_for_function(
        "(title) => document.getElementById('latent-title').textContent === title",
        arg=f"Latent #{expected.latent}",
    )
    assert f"latent #{expected.latent} at layer {expected.layer}" in page.inner_text(
        "#prompt-source"
    )
    assert page.input_value("#steer-layer") == str(expected.layer)
    assert address_prompt(page) is None  # the address names no prompt until one is analysed


def test_the_address_names_the_prompt_and_follows_the_history(page, server_url: str) -> None:
    page.goto(prompt_address(server_url, PROMPT))
    wait_for_prompt(page, PROMPT)
    assert page.input_value("#prompt") == PROMPT
    assert page.is_hidden("#prompt-source")

    page.fill("#prompt", OTHER_PROMPT)
    page.click("#analyse")
    wait_for_prompt(page, OTHER_PROMPT)
    assert address_prompt(page) == OTHER_PROMPT

    page.go_back()
    wait_for_prompt(page, PROMPT)
    assert page.input_value("#prompt") == PROMPT
    page.go_forward()
    wait_for_prompt(page, OTHER_PROMPT)

    page.evaluate("location.hash = '#prompt=' + encodeURIComponent('def add(a, b):')")
    wait_for_prompt(page, "def add(a, b):")
    page.evaluate("location.hash = '#prompt=%E0%A4%A'")
    page.wait_for_selector("#error:not([hidden])")
    assert "percent-encoded" in page.inner_text("#error")


def context_filling_prompt(model: MLSAETransformer) -> str:
    tokenizer = model.transformer.tokenizer
    prompt = tokenizer.decode(tokenizer("ab " * 200)["input_ids"][:128])
    assert len(tokenizer(prompt)["input_ids"]) == 128
    return prompt


def open_a_firing_latent(page) -> str:
    page.locator("#heatmap td.cell:not([data-value='0.0000'])").last.click()
    chip = page.locator("#cell-latents .latent-chip").first
    chip.wait_for()
    latent = chip.get_attribute("data-latent")
    chip.click()
    page.wait_for_function(
        "(title) => document.getElementById('latent-title').textContent === title",
        arg=f"Latent #{latent}",
    )
    page.wait_for_selector("#latent-tokens .token-column")
    return latent


def outside_the_latent_panel(page) -> int:
    """How many of the latent panel's token columns stick out of it."""
    return page.evaluate(
        """() => {
          const panel = document.getElementById('latent-panel').getBoundingClientRect();
          return [...document.querySelectorAll('#latent-tokens .token-column')]
            .map((node) => node.getBoundingClientRect())
            .filter((box) => box.left < panel.left || box.right > panel.right).length;
        }"""
    )


def test_a_long_prompt_wraps_in_the_latent_panel(
    page, server_url: str, model: MLSAETransformer
) -> None:
    prompt = context_filling_prompt(model)
    page.goto(prompt_address(server_url, prompt))
    wait_for_prompt(page, prompt)
    latent = open_a_firing_latent(page)
    trace = page.request.post(
        server_url + "api/latent", data={"prompt": prompt, "latent": int(latent)}
    ).json()
    columns = page.locator("#latent-tokens .token-column")
    assert columns.count() == 128
    for layer, row in enumerate(trace["acts"]):
        cells = page.locator(f"#latent-tokens .layer-cell[data-layer='{layer}']")
        values = [
            float(value) for value in cells.evaluate_all("(n) => n.map((c) => c.dataset.value)")
        ]
        assert values == pytest.approx(row, abs=1e-4)
    for width in (1440, 1000, 700):
        page.set_viewport_size({"width": width, "height": 1000})
        assert outside_the_latent_panel(page) == 0
        assert page.evaluate("document.documentElement.scrollWidth") <= width


def histogram_axes(page) -> list[dict]:
    """Per layer: the count axis's ticks (count, y) and the bars' counts, tops and bottoms."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#histograms figure svg')].map((svg) => ({
          ticks: [...svg.querySelectorAll('line.grid')].map(
            (line) => [Number(line.dataset.count), Number(line.getAttribute('y1'))]),
          labels: [...svg.querySelectorAll('text.tick[data-count]')].map((t) => t.textContent),
          bars: [...svg.querySelectorAll('rect.bar')].map((rect) => [
            Number(rect.dataset.count),
            Number(rect.getAttribute('y')),
            Number(rect.getAttribute('y')) + Number(rect.getAttribute('height')),
          ]),
        }))"""
    )


def test_histograms_have_a_count_axis(page, server_url: str) -> None:
    page.goto(prompt_address(server_url, PROMPT))
    wait_for_prompt(page, PROMPT)
    page.wait_for_selector("#histograms figure svg line.grid", state="attached")
    counts = page.request.post(
        server_url + "api/histograms", data={"prompt": PROMPT, "bins": 32}
    ).json()["counts"]
    top = max(max(row) for row in counts)
    axes = histogram_axes(page)
    assert len(axes) == len(counts)
    for axis, layer_counts in zip(axes, counts, strict=True):
        tick_counts = [count for count, _ in axis["ticks"]]
        assert tick_counts[0] == 0 and tick_counts[-1] >= top
        assert axis["labels"] == [str(count) for count in tick_counts]
        (_, y_zero), (last, y_last) = axis["ticks"][0], axis["ticks"][-1]
        assert [bar[0] for bar in axis["bars"]] == layer_counts
        for count, y_top, y_bottom in axis["bars"]:
            assert y_bottom == pytest.approx(y_zero)
            assert y_top == pytest.approx(y_zero + (y_last - y_zero) * count / last)


def test_analyse_a_prompt_and_open_a_latent(page, server_url: str, tmp_path: Path) -> None:
    page.goto(server_url)
    page.wait_for_selector("#latent-tokens .token-column")  # the opening prompt, shown
    page.fill("#prompt", PROMPT)
    page.click("#analyse")
    wait_for_prompt(page, PROMPT)
    n_tokens = page.locator("#tokens .tok").count()
    assert page.locator("#heatmap td.cell").count() == 4 * n_tokens
    assert page.locator("#heatmap td.cell:not([data-value='0.0000'])").count() > 0

    open_a_firing_latent(page)
    page.wait_for_selector("#examples details[open] .example")
    assert page.locator("#examples details").count() == 4
    page.wait_for_selector("#logits [data-panel=steering] table")
    page.wait_for_selector("#histograms figure svg")
    page.wait_for_selector("#metrics tbody tr")

    screenshot = tmp_path / "explorer.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, ARTIFACTS / "explorer.png")
