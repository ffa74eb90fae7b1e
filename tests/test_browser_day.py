"""A new user's whole day in the studio, through the page, on the shipped micro model: generate, make a dataset from
their own pictures, train a LoRA (stop it, resume it), compose it with a second LoRA in boxes, watermark the model
and verify an image, upscale a result. Every step's visible result is checked, and a full-page screenshot of every
step is kept in tests/artifacts/day/ (gitignored) to be looked at."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import MICRO_MODEL, compose_canvas_point, number, open_tab, pick, run_compose, running_studio, type_number, \
    upload

pytestmark = pytest.mark.browser
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "day"
NAME, MARK = "day-star", "day-mark"  # the day's LoRA and watermark adapter
LORA_RUN = f"-lora-{NAME}"  # run names end so
STEPS = 4  # LoRA training steps


def progress_says(page, run: str, status: str, timeout: float) -> None:
    """Wait for the Train tab's progress box to show ``status`` for the run whose name ends with ``run``."""
    page.wait_for_function(f"(() => {{ const t = document.querySelector('#train-progress-box')?.innerText ?? ''; "
                           f"return t.includes({json.dumps(run + ' —')}) && t.includes({json.dumps(status)}); }})()",
                           timeout=timeout)


def test_a_new_users_day(browser, tmp_path, monkeypatch):
    from microworld.scenes import SceneConfig, restrict, write_dataset
    from core.safetensors_files import read_metadata
    from pipelines.upscale import default_sr_model_path
    from pipelines.watermark.extractor import load_extractor
    from pipelines.watermark.shipped import ASSETS, EXTRACTOR_FILE
    from pipelines.watermark.verify import load_image, verify

    if not (MICRO_MODEL / "model_index.json").is_file() or not (ASSETS / EXTRACTOR_FILE).is_file() \
            or not default_sr_model_path().is_file():
        pytest.skip("needs the shipped micro model, watermark extractor and upscaler")
    started = time.perf_counter()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    shots: list[str] = []
    last = [started]

    def shot(page, name: str) -> None:
        page.wait_for_timeout(300)  # let the last update paint
        path = ARTIFACTS / f"{len(shots) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        now = time.perf_counter()
        shots.append(f"{path.name} {now - last[0]:.0f} s")
        last[0] = now

    home = tmp_path / "home"  # a new user: a data folder of their own (no other test's runs in its queue)
    monkeypatch.setenv("ATELIER_HOME", str(home))
    adapters = home / "adapters"
    pictures = tmp_path / "my-pictures"  # the user's own pictures: a shape the base model does not know
    write_dataset(pictures, 6, seed=3, config=restrict(SceneConfig(), shape="star", objects=1))
    uploads = sorted(str(p) for p in pictures.iterdir() if p.suffix in (".png", ".txt"))
    outputs = tmp_path / "outputs"
    with running_studio(MICRO_MODEL, outputs) as url:
        page = open_tab(browser, url, width=1500, height=1200)

        # 1. Generate an image on the micro model.
        page.locator("#gen-prompt textarea").fill("a red circle in the center, gray background")
        page.locator("#gen-steps input[type=number]").fill("4")
        page.locator("#gen-seed input").fill("7")
        page.locator("#gen-prompt textarea").press("Control+Enter")  # as in A1111: no need to reach for the button
        page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('Saved')", timeout=90_000)
        page.wait_for_function("(() => { const i = document.querySelector('#gen-gallery img'); "
                               "return i && i.complete && i.naturalWidth > 0; })()", timeout=15_000)
        assert "00000-7.png" in page.locator("#gen-status").inner_text()
        assert Image.open(outputs / "00000-7.png").size == (64, 64)
        assert "Seed: 7" in page.locator("#gen-info textarea").input_value()
        shot(page, "generate")

        # 2. A dataset from the user's own pictures, uploaded through the Train tab.
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-name textarea, #train-name input").first.fill(NAME)
        page.locator("#train-upload input[type=file]").set_input_files(uploads)
        page.wait_for_function("document.querySelector('#train-arithmetic textarea')?.value"
                               ".includes('6 images × 1 repeats ÷ batch 4')", timeout=60_000)  # the micro preset
        dataset = home / "datasets" / NAME
        assert page.locator("#train-folder textarea, #train-folder input").first.input_value() == str(dataset)
        assert sorted(p.name for p in dataset.iterdir()) == sorted(Path(p).name for p in uploads)
        for txt in pictures.glob("*.txt"):
            assert (dataset / txt.name).read_text() == txt.read_text()
        shot(page, "dataset")

        # 3. Train a LoRA on it: start, stop at once (while the job is still loading), resume, see it done.
        page.locator("#train-trigger textarea, #train-trigger input").first.fill("sks")
        page.locator("#train-prompts textarea").fill("sks a red star in the center, gray background")  # a preview
        type_number(page, "train-steps", STEPS)
        type_number(page, "train-ckpt-every", 1000)
        page.locator("#train-start").click()
        progress_says(page, LORA_RUN, "running", 60_000)
        assert page.locator("#train-resume").is_disabled()  # nothing to resume while it runs
        assert page.locator("#train-stop").is_enabled()
        shot(page, "train-running")
        page.locator("#train-stop").click()
        progress_says(page, LORA_RUN, "stopped", 120_000)
        run_dir = next((home / "runs").glob(f"*{LORA_RUN}"))
        stopped = int(page.locator("#train-progress-box").inner_text().split("step ")[1].split("/")[0])
        assert 1 <= stopped < STEPS and (run_dir / "checkpoints" / f"step-{stopped:07d}").is_dir()
        assert not (adapters / f"{NAME}.safetensors").exists()
        page.reload()  # a page refresh re-attaches to the newest run, stopped: Resume is offered, Stop is not
        page.get_by_role("tab", name="Train").click()
        progress_says(page, LORA_RUN, "stopped", 60_000)
        # ...and the New-run form is as the user left it (the browser keeps it)
        page.wait_for_function("document.querySelector('#train-trigger textarea, #train-trigger input')?.value "
                               "=== 'sks'", timeout=15_000)
        assert page.locator("#train-name textarea, #train-name input").first.input_value() == NAME
        assert page.locator("#train-prompts textarea").input_value().startswith("sks a red star")
        assert page.locator("#train-steps input").input_value() == str(STEPS)
        page.wait_for_function("document.querySelector('#train-resume')?.disabled === false", timeout=10_000)
        assert page.locator("#train-stop").is_disabled()
        shot(page, "train-stopped")
        page.locator("#train-resume").click()
        progress_says(page, LORA_RUN, "done", 180_000)
        lora = adapters / f"{NAME}.safetensors"
        assert str(lora) in page.locator("#train-progress-box").inner_text()
        assert f"step {STEPS}/{STEPS}" in page.locator("#train-progress-box").inner_text()
        assert read_metadata(lora).get("atelier.method") == "lora"
        log = page.locator("#train-log textarea").input_value()
        assert f"(step {stopped})" in log and "resumed from" in log and f"step {STEPS}/{STEPS}" in log
        assert "{'" not in log  # sentences, not Python dicts
        shot(page, "train-done")

        # 4. Compose the new LoRA (left box) with a shipped example LoRA (right box).
        page.get_by_role("tab", name="Library").click()  # the new adapter is in the Library, without a reload...
        page.wait_for_function(f"document.querySelector('#lib-table')?.innerText.includes('{NAME}')", timeout=30_000)
        pick(page, "lib-chosen", f"{NAME}.safetensors")  # its card: the run's last preview, and the run by name
        page.wait_for_function(f"document.querySelector('#lib-details')?.innerText.includes('{run_dir.name}')",
                               timeout=30_000)
        page.wait_for_function("(() => { const i = document.querySelector('#lib-thumb img'); "
                               "return i && i.complete && i.naturalWidth > 0; })()", timeout=30_000)
        card = page.locator("#lib-details").inner_text()
        assert "Train tab → Runs" in card and f"steps {STEPS}" in card and NAME in card, card
        shot(page, "library-card")
        page.get_by_role("tab", name="Compose").click()  # ...and among the Compose tab's LoRAs
        pick(page, "compose-lora-0", re.compile(rf"^{NAME}\.safetensors"))
        page.locator("#compose-prompt-0 textarea").fill("sks a red star in the center, gray background")
        assert "heart.safetensors" in page.locator("#compose-lora-1 input").input_value()
        x, y, scale = compose_canvas_point(page, 0.21, settle_ms=800)  # inside concept 1's box
        page.mouse.move(x, y)  # the box dragged right on the canvas...
        page.mouse.down()
        page.mouse.move(x + 20 * scale, y, steps=6)
        page.mouse.up()
        page.wait_for_function("parseFloat(document.querySelector('#compose-x0-0 input')?.value) > 0.05",
                               timeout=15_000)
        settled = None  # each step of the drag is a round trip to the server: wait until the last one has landed
        for _ in range(30):
            now = [number(page, f"compose-{n}-0").input_value() for n in ("x0", "x1")]
            if now == settled:
                break
            settled = now
            page.wait_for_timeout(1000)
        type_number(page, "compose-x1-0", 0.44)  # ...then its right edge typed
        box = [float(number(page, f"compose-{n}-0").input_value()) for n in ("x0", "y0", "x1", "y1")]
        assert 0.05 < box[0] < 0.1 and box[2] == 0.44 and box[1] == pytest.approx(0.05, abs=0.01)
        type_number(page, "compose-steps", 6)
        run_compose(page, 90_000)
        composed = sorted(outputs.glob("compose-*.png"))
        assert len(composed) == 1 and composed[0].name in page.locator("#compose-status").inner_text()
        assert Image.open(composed[0]).size == (128, 64)
        record = json.loads(composed[0].with_suffix(".json").read_text())["composition"]
        assert [Path(c["lora"]).name for c in record["concepts"]] == [f"{NAME}.safetensors", "heart.safetensors"]
        assert record["concepts"][0]["box"] == pytest.approx(box)
        shot(page, "compose")

        # 5. Watermark the model from the Train tab, generate with the watermark, verify the image.
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("Watermark (your key in every image the model decodes)").click()
        key = page.locator("#train-wm-key textarea, #train-wm-key input").first.input_value()
        assert re.fullmatch(r"[0-9a-f]{12}", key), key  # a fresh random key, shown to keep
        page.locator("#train-wm-images textarea, #train-wm-images input").first.fill(str(dataset))
        type_number(page, "train-wm-steps", 4)
        page.locator("#train-wm-name textarea, #train-wm-name input").first.fill(MARK)
        page.locator("#train-wm-start").click()
        page.wait_for_function(f"document.querySelector('#train-runs input')?.value.endsWith('-watermark-{MARK}')",
                               timeout=30_000)
        progress_says(page, f"-watermark-{MARK}", "done", 180_000)
        mark = adapters / f"{MARK}.safetensors"
        meta = read_metadata(mark)
        assert meta["atelier.method"] == "watermark" and meta["atelier.watermark_key"] == key
        assert str(mark) in page.locator("#train-progress-box").inner_text()
        assert "step 4/4" in page.locator("#train-progress-box").inner_text()
        assert "bits" in page.locator("#train-log textarea").input_value()
        # a watermark run keeps no checkpoints: Resume is not offered for it (nor Stop, once it is done)
        page.wait_for_function("document.querySelector('#train-resume')?.disabled", timeout=10_000)
        assert page.locator("#train-stop").is_disabled()
        shot(page, "watermark-trained")

        # The new adapters in the Generate tab, without a reload: the day's LoRA named in the prompt as in A1111,
        # the watermark (its list follows the adapters folder) on every image.
        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-prompt textarea").fill(f"sks a blue star in the center, gray background <lora:{NAME}:1>")
        page.locator("#gen-steps input[type=number]").fill("4")
        page.locator("#gen-seed input").fill("11")
        page.get_by_text("Adapters (LoRA, SaRA, watermark)").click()
        for _ in range(60):  # the list's next look at the folder (every 3 s; later under load) brings the watermark
            page.locator("#gen-watermark input").click()
            if page.get_by_role("option", name=f"{MARK}.safetensors").count():
                break
            page.keyboard.press("Escape")
            page.wait_for_timeout(1500)
        page.get_by_role("option", name=f"{MARK}.safetensors").click()
        page.locator("#gen-run").click()
        page.wait_for_function("document.querySelector('#gen-status')?.innerText.includes('00001-11.png')",
                               timeout=90_000)
        info = page.locator("#gen-info textarea").input_value()
        assert f'Lora: "{NAME}:1"' in info and f"Watermark: {MARK}" in info and key not in info
        marked = outputs / "00001-11.png"
        shot(page, "generate-watermarked")

        expected = verify([(marked.name, load_image(marked))], key, load_extractor(ASSETS / EXTRACTOR_FILE), 1e-6)
        page.get_by_role("tab", name="Verify").click()
        upload(page, "wm-files", [marked])
        pick(page, "wm-adapter", f"{MARK}.safetensors")
        page.locator("#wm-verify").click()
        page.wait_for_function(f"document.querySelector('#wm-summary')?.innerText.includes('{key}')", timeout=60_000)
        table = page.locator("#wm-table").inner_text()
        assert marked.name in table and f"{expected.per_image[0][1].matched}/48" in table
        shot(page, "verify")

        # 6. Upscale the composition ×4 in the Upscale tab.
        page.get_by_role("tab", name="Upscale").click()
        upload(page, "up-files", [composed[0]])
        page.locator("#up-run").click()
        page.wait_for_function("document.querySelector('#up-status')?.innerText.includes('Upscaled 1')",
                               timeout=120_000)
        result = outputs / "upscaled" / f"{composed[0].stem}_x4.png"
        assert Image.open(result).size == (512, 256)
        page.wait_for_function("document.querySelectorAll('#up-gallery img').length >= 1", timeout=15_000)
        shot(page, "upscale")
    elapsed = time.perf_counter() - started
    print(f"\na new user's day: {elapsed:.0f} s; screenshots in {ARTIFACTS} (time since the previous one):\n  " +
          "\n  ".join(shots))
