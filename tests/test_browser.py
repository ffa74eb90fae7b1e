"""The real page in headless Chromium: a user generates an image and cancels a long run."""
from __future__ import annotations

import pytest

from conftest import open_tab, running_studio
from core.png_metadata import parse_parameters, read_png_parameters

pytestmark = pytest.mark.browser


@pytest.fixture
def studio(default_model_dir, tmp_path):
    outputs = tmp_path / "outputs"
    with running_studio(default_model_dir, outputs) as url:
        yield url, outputs


def test_generate_through_the_page(browser, studio, tmp_path):
    url, outputs = studio
    page = open_tab(browser, url)
    page.locator("#gen-prompt textarea").fill("a red circle on the left, gray background")
    page.locator("#gen-steps input[type=number]").fill("4")
    page.locator("#gen-batch input[type=number]").fill("2")
    page.locator("#gen-seed input").fill("123")
    page.locator("#gen-run").click()
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 2", timeout=90_000)
    page.screenshot(path=str(tmp_path / "generate.png"), full_page=True)
    assert "Seed: 124" in page.locator("#gen-info textarea").input_value()
    saved = sorted(outputs.glob("*.png"))
    assert [p.name for p in saved] == ["00000-123.png", "00001-124.png"]
    parsed = parse_parameters(read_png_parameters(saved[0]))
    assert parsed["prompt"] == "a red circle on the left, gray background" and parsed["settings"]["Steps"] == "4"
    assert saved[0].with_suffix(".json").is_file()
    # The page's images are the saved files, metadata included.
    src = page.locator("#gen-gallery img").first.get_attribute("src")
    assert src and "00000-123" in src


def test_cancel_stops_a_long_batch(browser, studio, tmp_path):
    url, outputs = studio
    page = open_tab(browser, url)
    page.locator("#gen-prompt textarea").fill("a blue square")
    page.locator("#gen-steps input[type=number]").fill("150")
    page.locator("#gen-batch input[type=number]").fill("16")
    page.locator("#gen-run").click()
    # Wait for the generation itself (its progress says "Generating"), not just the queue's pending bar: a Cancel
    # before the run starts has nothing to stop.
    page.wait_for_function("document.body.innerText.includes('Generating')", timeout=60_000)
    page.locator("#gen-cancel").click()
    page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('Cancelled')", timeout=60_000)
    page.screenshot(path=str(tmp_path / "cancel.png"), full_page=True)
    assert len(list(outputs.glob("*.png"))) < 16
    # The server still serves after a cancel: a short run completes.
    page.locator("#gen-steps input[type=number]").fill("2")
    page.locator("#gen-batch input[type=number]").fill("1")
    page.locator("#gen-run").click()
    page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('Saved')", timeout=60_000)


def test_login_required_when_auth_is_set(browser, default_model_dir, tmp_path):
    outputs = tmp_path / "outputs"
    with running_studio(default_model_dir, outputs, "--auth", "ada:s3cret") as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("input[type=password]", timeout=30_000)
        assert page.locator("#gen-run").count() == 0
        page.locator("input[type=text], input:not([type])").first.fill("ada")
        page.locator("input[type=password]").fill("s3cret")
        page.keyboard.press("Enter")
        page.wait_for_selector("#gen-run", timeout=30_000)
        page.screenshot(path=str(tmp_path / "after-login.png"))
