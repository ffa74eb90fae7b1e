"""A user upscales images in the Upscale tab and from the Generate tab."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipelines.upscale import default_sr_model_path
from conftest import open_tab, running_studio, upload

pytestmark = pytest.mark.browser
DSCF = Path(__file__).resolve().parents[2] / "shared" / "models" / "dscf-x4" / "team23_DSCF.pth"


def test_upscale_tab_and_generate_action(browser, default_model_dir, tmp_path):
    if not default_sr_model_path().is_file() and not DSCF.is_file():
        pytest.skip("no SR model: neither the shipped one nor the reference weights")
    images = []
    for i, colour in enumerate(("red", "navy")):
        path = tmp_path / f"in{i}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        images.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    outputs = tmp_path / "outputs"
    with running_studio(default_model_dir, outputs) as url:
        page = open_tab(browser, url, "Upscale", width=1400, height=1100)
        if not default_sr_model_path().is_file():
            page.get_by_text("Official checkpoint file").click()
            page.locator("#up-official textarea, #up-official input").first.fill(str(DSCF))
        upload(page, "up-files", images + [tmp_path / "bad.png"])
        page.locator("#up-run").click()
        page.wait_for_function("document.querySelector('#up-status')?.innerText.includes('Upscaled 2')",
                               timeout=120_000)
        status = page.locator("#up-status").inner_text()
        assert "bad.png" in status and "not a readable image" in status
        page.screenshot(path=str(tmp_path / "upscale.png"), full_page=True)
        results = sorted((outputs / "upscaled").glob("*.png"))
        assert [p.name for p in results] == ["in0_x4.png", "in1_x4.png"]
        assert Image.open(results[0]).size == (160, 120)

        if default_sr_model_path().is_file():  # the Generate tab's action uses the shipped model
            page.get_by_role("tab", name="Generate").click()
            page.locator("#gen-prompt textarea").fill("a red circle")
            page.locator("#gen-steps input[type=number]").fill("2")
            page.locator("#gen-run").click()
            page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('Saved')",
                                   timeout=60_000)
            page.locator("#gen-upscale").click()
            page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('Upscaled 1')",
                                   timeout=60_000)
            assert len(list((outputs / "upscaled").glob("*_x4.png"))) == 3
