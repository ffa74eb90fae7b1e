"""The Generate tab's per-image actions, session history and refusals, through the real page in headless Chromium.

Screenshots of each step are kept in tests/artifacts/generate-actions/ (gitignored) to be looked at."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import open_tab, running_studio

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "generate-actions"
PROMPT = "a red circle on the left, gray background"
ERROR_BADGE = "[data-testid=status-tracker] .error"  # what Gradio draws over an output whose event failed


def wait_status(page, text: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(f"document.querySelector('#gen-status')?.innerText.includes({text!r})",
                           timeout=timeout_ms)


def select_image(page, gallery: str, index: int) -> None:
    """Click a gallery's thumbnail and wait until the actions are enabled for it."""
    page.locator(f"#{gallery} .thumbnail-item").nth(index).click()
    page.wait_for_function("!document.querySelector('#gen-use-seed').disabled", timeout=10_000)


def test_image_actions_history_and_refusal(browser, default_model_dir, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_studio(default_model_dir, tmp_path / "outputs") as url:
        page = open_tab(browser, url)
        assert page.locator("#gen-use-seed").is_disabled() and page.locator("#gen-to-upscale").is_disabled()
        page.locator("#gen-prompt textarea").fill(PROMPT)
        page.locator("#gen-steps input[type=number]").fill("4")
        page.locator("#gen-batch input[type=number]").fill("2")
        page.locator("#gen-seed input").fill("123")
        page.locator("#gen-run").click()
        wait_status(page, "00001-124.png", 90_000)

        # The second image: its seed into the Seed field, then the image into Upscale and Verify.
        select_image(page, "gen-gallery", 1)
        assert "00001-124.png" in page.locator("#gen-selected").inner_text()
        page.locator("#gen-use-seed").click()
        page.wait_for_function("document.querySelector('#gen-seed input').value === '124'", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "01-selected.png"), full_page=True)
        for button, tab, files in (("gen-to-upscale", "Upscale", "up-files"), ("gen-to-verify", "Verify", "wm-files")):
            page.locator(f"#{button}").click()
            page.locator(f'#{files} td.filename[aria-label="00001-124.png"]').wait_for(timeout=15_000)
            assert page.get_by_role("tab", name=tab).get_attribute("aria-selected") == "true"
            page.screenshot(path=str(ARTIFACTS / f"02-sent-to-{tab.lower()}.png"), full_page=True)
            page.get_by_role("tab", name="Generate").click()
        # Compose makes pictures from prompts and boxes: the image's prompt and settings go there.
        page.locator("#gen-to-compose").click()
        page.wait_for_function("document.querySelector('#compose-seed input')?.value === '124'", timeout=15_000)
        assert page.locator("#compose-global textarea").input_value() == PROMPT
        assert page.locator("#compose-steps input[type=number]").input_value() == "4"
        page.screenshot(path=str(ARTIFACTS / "03-sent-to-compose.png"), full_page=True)
        page.get_by_role("tab", name="Generate").click()

        # A second Generate replaces the results; the session's history keeps all three, newest first.
        page.locator("#gen-batch input[type=number]").fill("1")
        page.locator("#gen-seed input").fill("7")
        page.locator("#gen-run").click()
        wait_status(page, "00002-7.png")
        page.wait_for_function("document.querySelectorAll('#gen-gallery .thumbnail-item').length === 1")
        page.locator("#gen-history-box").get_by_text("This session's images").click()
        page.wait_for_function("document.querySelectorAll('#gen-history .thumbnail-item img').length === 3",
                               timeout=15_000)
        sources = [img.get_attribute("src") for img in page.locator("#gen-history .thumbnail-item img").all()]
        assert [next(n for n in ("00002-7", "00001-124", "00000-123") if n in s) for s in sources] == \
            ["00002-7", "00001-124", "00000-123"]
        select_image(page, "gen-history", 2)  # the actions work from the history too
        page.locator("#gen-use-seed").click()
        page.wait_for_function("document.querySelector('#gen-seed input').value === '123'", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "04-history.png"), full_page=True)

        # A refused request (an unknown <lora:…> name): a warning, and the results stay as they were.
        page.locator("#gen-prompt textarea").fill("<lora:nosuch:1> " + PROMPT)
        page.locator("#gen-run").click()
        page.locator(".toast-body", has_text="nosuch").first.wait_for(timeout=30_000)
        wait_status(page, "no adapter of that name")
        page.wait_for_timeout(400)  # the toast fades in
        page.screenshot(path=str(ARTIFACTS / "05-refused.png"), full_page=True)
        assert "00002-7" in page.locator("#gen-gallery img").first.get_attribute("src")
        # the history is in preview now (an image of it is selected): its strip and grid show the same three
        assert len({i.get_attribute("src") for i in page.locator("#gen-history .thumbnail-item img").all()}) == 3
        assert "Seed: 7" in page.locator("#gen-info textarea").input_value()
        assert page.locator(ERROR_BADGE).count() == 0
