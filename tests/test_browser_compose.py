"""A user composes two concept LoRAs in the Compose tab: boxes on the canvas and in numbers, the result with its
overlay, the PNG in the outputs folder, a composition saved and loaded back, and a bad file refused by name."""
from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from conftest import MICRO_MODEL, compose_canvas_point, number, open_tab, run_compose, running_studio, type_number

pytestmark = pytest.mark.browser


def value_of(page, elem_id: str) -> float:
    return float(number(page, elem_id).input_value())


def image_loaded(page, elem_id: str) -> bool:
    return page.evaluate("id => { const i = document.querySelector('#' + id + ' img'); "
                         "return !!i && i.complete && i.naturalWidth > 0; }", elem_id)


def test_compose_from_the_page_save_and_load(browser, tmp_path):
    if not (MICRO_MODEL / "model_index.json").is_file():
        pytest.skip("the example concepts are trained on the shipped micro model")
    started = time.perf_counter()
    outputs = tmp_path / "outputs"
    with running_studio(MICRO_MODEL, outputs) as url:
        page = open_tab(browser, url, "Compose")
        assert "ring.safetensors" in page.locator("#compose-lora-0 input").input_value()
        assert "heart.safetensors" in page.locator("#compose-lora-1 input").input_value()
        assert value_of(page, "compose-x0-1") == 0.52

        # Drag concept 2's box to the left on the canvas: its numbers follow.
        x, y, scale = compose_canvas_point(page, 0.75)

        def drag(dx: float, condition: str) -> None:
            page.mouse.move(x + (0 if dx < 0 else -dx) * scale, y)
            page.mouse.down()
            page.mouse.move(x + (dx if dx < 0 else 0) * scale, y, steps=6)
            page.mouse.up()
            page.wait_for_function(f"parseFloat(document.querySelector('#compose-x0-1 input')?.value) {condition}",
                                   timeout=15_000)

        drag(-40, "< 0.5")
        assert 0.40 < value_of(page, "compose-x0-1") < 0.48 and 0.88 < value_of(page, "compose-x1-1") < 0.95
        assert value_of(page, "compose-y0-1") == pytest.approx(0.05, abs=0.01)
        # dragged back onto the place the page drew it at: the numbers follow again
        drag(40, "> 0.5")
        assert value_of(page, "compose-x0-1") == pytest.approx(0.52, abs=0.01)
        drag(-40, "< 0.5")
        # ...and typed numbers move it back.
        type_number(page, "compose-x0-1", 0.52)
        type_number(page, "compose-x1-1", 0.98)
        type_number(page, "compose-steps", 6)
        page.wait_for_timeout(500)
        assert value_of(page, "compose-x0-1") == 0.52

        run_compose(page, 60_000)
        assert image_loaded(page, "compose-result") and image_loaded(page, "compose-overlay")
        pngs = sorted(outputs.glob("compose-*.png"))
        assert len(pngs) == 1 and pngs[0].name in page.locator("#compose-status").inner_text()
        assert Image.open(pngs[0]).size == (128, 64)
        record = json.loads(pngs[0].with_suffix(".json").read_text())
        assert record["seed"] == 8 and record["composition"]["steps"] == 6
        assert [c["strength"] for c in record["composition"]["concepts"]] == [1.3, 0.8]
        assert [c["box"] for c in record["composition"]["concepts"]] == [[0.02, 0.05, 0.48, 0.95],
                                                                        [0.52, 0.05, 0.98, 0.95]]
        page.screenshot(path=str(tmp_path / "composed.png"), full_page=True)

        # Save the composition as JSON (a download link), change some fields, load the file back.
        page.locator("#compose-save").click()
        link = page.locator("#compose-file a[href]").first
        link.wait_for(timeout=15_000)
        saved = tmp_path / "saved.json"
        saved.write_bytes(page.request.get(link.get_attribute("href")).body())
        data = json.loads(saved.read_text())
        assert data["prompt"] == page.locator("#compose-global textarea").input_value()
        assert [c["prompt"][:3] for c in data["concepts"]] == ["qwe", "zwx"] and data["steps"] == 6

        page.locator("#compose-global textarea").fill("something else entirely")
        type_number(page, "compose-x0-0", 0.3)
        type_number(page, "compose-strength-1", 0.5)
        type_number(page, "compose-seed", 99)
        page.locator("#compose-injection input[type=checkbox]").uncheck()
        with page.expect_file_chooser() as chooser:
            page.locator("#compose-load").click()
        chooser.value.set_files(str(saved))
        page.wait_for_function("document.querySelector('#compose-global textarea')?.value === 'gray background'",
                               timeout=15_000)
        assert value_of(page, "compose-x0-0") == 0.02 and value_of(page, "compose-strength-1") == 0.8
        assert value_of(page, "compose-seed") == 8 and value_of(page, "compose-steps") == 6
        assert page.locator("#compose-injection input[type=checkbox]").is_checked()
        assert "heart.safetensors" in page.locator("#compose-lora-1 input").input_value()
        page.screenshot(path=str(tmp_path / "loaded.png"), full_page=True)

        # A hand-written file naming the LoRAs by file name only (as shared files do) with a third concept.
        three = tmp_path / "three.json"
        three.write_text(json.dumps({**data, "prompt": "three shapes", "concepts": [
            *data["concepts"], {"lora": "heart.safetensors", "box": [0.3, 0.2, 0.7, 0.8], "prompt": "zwx a heart",
                                "trigger": "zwx"}]}))
        with page.expect_file_chooser() as chooser:
            page.locator("#compose-load").click()
        chooser.value.set_files(str(three))
        page.wait_for_function("document.querySelector('#compose-global textarea')?.value === 'three shapes'",
                               timeout=15_000)
        number(page, "compose-x0-2").wait_for(timeout=5_000)  # the accordion of concepts 3 and 4 opened
        assert value_of(page, "compose-x0-2") == 0.3
        assert "heart.safetensors" in page.locator("#compose-lora-2 input").input_value()
        assert page.locator("#compose-prompt-2 textarea").input_value() == "zwx a heart"
        with page.expect_file_chooser() as chooser:
            page.locator("#compose-load").click()
        chooser.value.set_files(str(saved))
        page.wait_for_function("document.querySelector('#compose-global textarea')?.value === 'gray background'",
                               timeout=15_000)

        # A file with x0 > x1 is refused with the field named, and the page keeps what it had.
        bad = tmp_path / "bad.json"
        data["concepts"][0]["box"] = [0.6, 0.05, 0.4, 0.95]
        data["prompt"] = "this must not appear"
        bad.write_text(json.dumps(data))
        with page.expect_file_chooser() as chooser:
            page.locator("#compose-load").click()
        chooser.value.set_files(str(bad))
        toast = page.locator(".toast-body", has_text="concepts[0].box: x0 must be less than x1")
        toast.wait_for(state="visible", timeout=15_000)
        assert "Traceback" not in toast.inner_text()
        page.wait_for_timeout(600)  # the toast fades in
        page.screenshot(path=str(tmp_path / "bad-file.png"), full_page=True)
        assert page.locator("#compose-global textarea").input_value() == "gray background"
        assert value_of(page, "compose-x0-0") == 0.02
    assert time.perf_counter() - started < 90
