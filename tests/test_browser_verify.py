"""A user verifies images in the Verify tab: the page shows what the library computes, and bad input is a message."""
from __future__ import annotations

import pytest
import torch

from conftest import open_tab, running_studio, upload
from microworld.scenes import SceneConfig, generate_scene
from pipelines.watermark.extractor import BitExtractor, ExtractorConfig, load_extractor, save_extractor
from pipelines.watermark.verify import identify, load_image, verify

pytestmark = pytest.mark.browser
KEY, OTHER = "3fa9c0d21b7e", "0123456789ab"


def test_verify_identify_and_robustness_from_the_page(browser, default_model_dir, atelier_home, tmp_path):
    torch.manual_seed(7)
    extractor_file = save_extractor(BitExtractor(ExtractorConfig(bits=48, filters=8, kernel=3)).eval(),
                                    atelier_home / "extractors" / "page-test.safetensors")
    images = []
    for i in range(2):
        path = tmp_path / f"scene{i}.png"
        generate_scene(40 + i, SceneConfig()).to_pil().save(path)
        images.append(path)
    extractor = load_extractor(extractor_file)
    expected = verify([(p.name, load_image(p)) for p in images], KEY, extractor, 1e-6)
    best = identify(load_image(images[0]), [OTHER, KEY], extractor, 1e-6)

    with running_studio(default_model_dir, tmp_path / "outputs") as url:
        page = open_tab(browser, url, "Verify")
        upload(page, "wm-files", images)
        page.locator("#wm-extractor input").click()
        page.get_by_role("option", name="page-test.safetensors").click()

        page.locator("#wm-key textarea, #wm-key input").first.fill("not-hex")
        page.locator("#wm-verify").click()
        toast = page.locator(".toast-body", has_text="not hexadecimal")
        toast.wait_for(timeout=30_000)
        page.locator(".toast-close").first.click()

        page.locator("#wm-key textarea, #wm-key input").first.fill(KEY)
        page.locator("#wm-verify").click()
        page.wait_for_function("document.querySelector('#wm-summary')?.innerText.includes('pooled over 2')",
                               timeout=60_000)
        table = page.locator("#wm-table").inner_text()
        for name, v in expected.per_image:
            assert name in table and f"{v.matched}/48" in table
        summary = page.locator("#wm-summary").inner_text()
        assert f"{expected.pooled.matched}/96" in summary
        page.screenshot(path=str(tmp_path / "verify.png"), full_page=True)

        page.locator("#wm-robust").click()
        page.wait_for_function("document.querySelector('#wm-table')?.innerText.includes('JPEG 50')", timeout=60_000)
        assert "rotation 25°" in page.locator("#wm-table").inner_text()

        page.locator("#wm-keys textarea").fill(f"{OTHER}\n{KEY}")
        page.locator("#wm-identify").click()
        page.wait_for_function("document.querySelector('#wm-table')?.innerText.includes('Bonferroni over 2 keys')",
                               timeout=60_000)
        assert f"{best.verdict.matched}/48" in page.locator("#wm-table").inner_text()
        page.screenshot(path=str(tmp_path / "identify.png"), full_page=True)


# Generating with a watermark adapter and verifying by that adapter: tests/test_browser_day.py (step 5).
