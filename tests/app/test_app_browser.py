"""The app in a real headless browser: Debian's chromium driven by Playwright, as a person uses it.

Screenshots are saved in ``test-artifacts/`` (or ``$FINETUNE_HELPER_TEST_ARTIFACTS``): look at them after changing
the UI.  ``playwright install`` is never run (it downloads); ``make test`` installs Debian's chromium with apt.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .conftest import ARTIFACTS, FAKE_TOKEN, AppServer

CHROMIUM = os.environ.get("FINETUNE_HELPER_CHROMIUM", "/usr/bin/chromium")

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    server = AppServer(root / "workspace", root / "app.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def page(browser_server):
    if not Path(CHROMIUM).exists():
        if os.environ.get("FINETUNE_HELPER_SKIP_BROWSER") == "1":
            pytest.skip(f"{CHROMIUM} missing and FINETUNE_HELPER_SKIP_BROWSER=1")
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(browser_server.url)
        page.get_by_role("button", name="Recommend", exact=True).wait_for()
        yield page
        browser.close()


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"app-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, f"{path} looks empty"
    return path


def plot_drawn(page, elem_id: str) -> None:
    """A Gradio native plot has drawn when its Vega view put a canvas (or SVG marks) in the element."""
    page.locator(f"#{elem_id}").locator("canvas, svg.marks").first.wait_for(state="visible")


def status_step(page) -> int:
    match = re.search(r"step (\d+)/", page.locator("#fh-status").inner_text())
    return int(match.group(1)) if match else -1


def test_recommend_shows_table_charts_and_code(page):
    page.get_by_role("button", name="Recommend", exact=True).click()
    table = page.locator("#settings-table")
    table.get_by_text("per_device_train_batch_size").filter(visible=True).first.wait_for()
    text = table.inner_text()
    for setting in ("gradient_accumulation_steps", "learning_rate", "warmup_ratio", "gradient_checkpointing"):
        assert setting in text
    assert "square-root rule" in text
    verdict = page.locator("#verdict").inner_text()
    assert "Fits" in verdict and "RTX 4090" in verdict
    plot_drawn(page, "memory-plot")
    plot_drawn(page, "lr-plot")
    page.locator("#export-code").get_by_text("SFTConfig(").first.wait_for()  # the default trainer: TRL
    page.locator("#downloads [aria-label=\"training_args.yaml\"]").wait_for()
    shot(page, "recommend")
    assert page.get_by_text("no run selected").count() == 0  # no error the user did not cause (page load)


def type_custom(page, label: str, text: str) -> None:
    """Type a free value into a dropdown that allows one (Enter would pick the first option that matches)."""
    box = page.get_by_label(label, exact=True)
    box.fill(text)
    page.keyboard.press("Escape")
    box.blur()


def test_bad_input_shows_an_error_and_the_app_keeps_working(page):
    type_custom(page, "GPU", "0GB")
    page.get_by_role("button", name="Recommend", exact=True).click()
    page.locator("#recommend-error").get_by_text("gpu: memory must be > 0").first.wait_for()
    shot(page, "error")
    # the last good recommendation stays on screen (no error badges in its place)
    assert page.locator("#settings-table").get_by_text("learning_rate").first.is_visible()
    assert page.locator("#verdict").get_by_text("RTX 4090").first.is_visible()
    type_custom(page, "GPU", "A100 80GB SXM")
    page.get_by_role("button", name="Recommend", exact=True).click()
    page.locator("#verdict").get_by_text("A100 80GB SXM").first.wait_for()


def test_train_tab_starts_a_tiny_run_shows_the_loss_and_stops_it(page):
    page.get_by_role("tab", name="Train").click()
    page.locator("#recipe-yaml").get_by_text("builtin:tiny-llama").first.wait_for()  # tiny-demo.yaml, loaded
    page.get_by_role("button", name="Start", exact=True).click()
    page.locator("#train-message").get_by_text("Started").wait_for()
    page.locator("#fh-status").get_by_text("training").wait_for(timeout=180_000)
    plot_drawn(page, "loss-plot")
    plot_drawn(page, "live-lr-plot")
    first = status_step(page)
    page.wait_for_function(
        "n => { const m = /step (\\d+)\\//.exec(document.querySelector('#fh-status').innerText); "
        "return m && +m[1] > n; }", arg=first + 50, timeout=120_000)  # the live view keeps updating
    assert status_step(page) > first
    assert "loss" in page.locator("#fh-status").inner_text()
    assert "step" in page.locator("#run-log textarea").input_value()
    shot(page, "train-running")

    page.get_by_role("button", name="Stop (saves a checkpoint)").click()
    page.locator("#train-message").get_by_text("Stopping").wait_for()
    page.locator("#fh-status").get_by_text("stopped").wait_for(timeout=120_000)
    assert "checkpoint" in page.locator("#fh-status").inner_text()
    assert FAKE_TOKEN not in page.content()
    shot(page, "train-stopped")


def test_runs_tab_lists_the_stopped_run(page):
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="Refresh list").click()
    page.get_by_text("stopped", exact=True).filter(visible=True).first.wait_for()
    plot_drawn(page, "past-loss-plot")  # the newest run is selected and its loss curve drawn
    page.get_by_text('"method": "full"').first.wait_for()  # its plan.json
    shot(page, "runs")


def test_a_dataset_shows_its_length_histogram_and_figures(page, browser_server):
    """The Recommend tab's dataset field: the figures and the histogram of the token lengths appear under the
    verdict, the plan is for the data (its seq_len, p99), and the field emptied hides them again."""
    import json as _json

    from finetune_helper.train.tiny import format_example

    rows = [format_example("What is 12 + 30? " + "7" * (n % 97), "42") for n in range(400)]
    (browser_server.workspace / "lengths.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    page.get_by_role("tab", name="Recommend").click()
    type_custom(page, "Model", "builtin:tiny-llama")
    type_custom(page, "GPU", "16GiB")
    page.get_by_label("Dataset (optional)").fill("lengths.jsonl")
    page.get_by_role("button", name="Recommend", exact=True).click()
    page.locator("#data-profile").get_by_text("400 examples").first.wait_for()
    plot_drawn(page, "data-plot")
    text = page.locator("#data-profile").inner_text()
    assert "tokens per example" in text and "padding at micro-batch" in text and "packing" in text
    seq = re.search(r"max_length (\d+) \(the plan's seq_len\)", text).group(1)
    page.locator("#verdict").get_by_text(f"seq {seq}").first.wait_for()
    page.locator("#data-plot").scroll_into_view_if_needed()
    shot(page, "recommend-data")
    page.get_by_label("Dataset (optional)").fill("")
    page.get_by_role("button", name="Recommend", exact=True).click()
    page.locator("#data-plot").wait_for(state="hidden")
    assert page.locator("#data-profile").inner_text().strip() == ""
