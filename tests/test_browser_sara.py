"""A user trains SaRA from the page: picks the method, sees the planned selection (count, θ, lr), fixes a bad budget,
starts a short run, watches it finish and gets a sparse delta file in the adapters folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import fill_train_form, open_tab, pick, running_studio, type_number

pytest.importorskip("playwright")
pytestmark = pytest.mark.browser

PLAN = "(document.querySelector('#train-sara-plan textarea')?.value ?? '')"
PLAN_RE = re.compile(r"^([\d,]+) of ([\d,]+) UNet weights \(([\d.]+)%\) with \|w\| < θ = ([\d.e+-]+); "
                     r"default learning rate ([\d.e+-]+)$")


def _plan(page) -> str:
    return page.locator("#train-sara-plan textarea").input_value()


def _type_budget(page, text: str) -> None:
    box = page.locator("#train-sara-budget textarea, #train-sara-budget input").first
    box.fill(text)
    box.press("Tab")


def test_sara_run_from_the_page(browser, default_model_dir, tmp_path):
    from microworld.scenes import SceneConfig, restrict, write_dataset
    from adapters.sara.files import is_sparse_delta_file

    data = tmp_path / "data"
    write_dataset(data, 4, seed=3, config=restrict(SceneConfig(), shape="star", objects=1))
    home = Path(os.environ["ATELIER_HOME"])
    with running_studio(default_model_dir, tmp_path / "outputs") as url:
        page = open_tab(browser, url, "Train", width=1500, height=1400)
        page.locator("#train-lora-rank").wait_for(state="visible", timeout=30_000)  # the page under load renders late
        assert not page.locator("#train-sara").is_visible()

        # Choosing SaRA swaps rank for the SaRA group and plans the default 5 % selection at once.
        page.locator("#train-method label", has_text="SaRA").click()
        page.locator("#train-sara").wait_for(state="visible", timeout=10_000)
        page.locator("#train-lora-rank").wait_for(state="hidden", timeout=10_000)
        page.wait_for_function("document.querySelector('#train-lr')?.innerText.includes('derived')", timeout=15_000)
        # the model family's SaRA preset fills the form (the micro model's: the benchmark's lr 2e-3) ...
        from models.loading import source_family
        from trainers.presets import find_preset, full_settings
        from trainers.registry import training_methods

        preset = find_preset(None, "sara", {f.name for f in training_methods()["sara"].option_fields()},
                             source_family(default_model_dir), "auto")
        page.wait_for_function("document.querySelector('#train-lr input').value == "
                               f"{json.dumps(str(full_settings(preset)['lr'] or 0))}", timeout=10_000)
        # ... and no preset leaves the learning rate to θ (0)
        pick(page, "train-preset", "none")
        page.wait_for_function("document.querySelector('#train-lr input').value == '0'", timeout=10_000)
        page.wait_for_function(f"{PLAN}.includes('θ =')", timeout=60_000)
        assert "(5.00%)" in _plan(page), _plan(page)

        _type_budget(page, "2%")
        page.wait_for_function(f"{PLAN}.includes('(2.00%)')", timeout=60_000)
        two = PLAN_RE.match(_plan(page))
        assert two, _plan(page)
        assert int(two[1].replace(",", "")) > 0 and float(two[4]) > 0

        _type_budget(page, "lots")
        page.wait_for_function(f"{PLAN}.startsWith('⚠ ')", timeout=30_000)
        assert "lots" in _plan(page) and "Traceback" not in _plan(page)

        _type_budget(page, "1%")
        page.wait_for_function(f"{PLAN}.includes('(1.00%)')", timeout=60_000)
        one = PLAN_RE.match(_plan(page))
        assert one, _plan(page)
        assert int(one[1].replace(",", "")) < int(two[1].replace(",", ""))
        assert float(one[4]) < float(two[4])  # a smaller budget means a smaller θ …
        assert float(one[5]) > float(two[5])  # … and a larger derived learning rate

        # A short run on the shared fields.
        name = f"sparse-{int(time.time())}"
        fill_train_form(page, data, steps=6, images=4, name=name, batch=1)
        page.screenshot(path=str(tmp_path / "sara-form.png"), full_page=True)
        started = time.perf_counter()
        page.locator("#train-start").click()
        # The panel first shows the newest earlier run (maybe another test's, done already): wait for this one.
        page.wait_for_function(f"(t => t.includes('{name}') && t.includes('done'))"
                               "(document.querySelector('#train-progress-box')?.innerText ?? '')", timeout=300_000)
        print(f"SaRA run of 6 steps: {time.perf_counter() - started:.1f} s from click to done")
        page.wait_for_function("document.querySelector('#train-log textarea')?.value.length > 0", timeout=10_000)
        shot = tmp_path / "sara-done.png"
        page.screenshot(path=str(shot), full_page=True)
        shutil.copy(shot, "/tmp/sara_ui.png")

        progress = page.locator("#train-progress-box").inner_text()
        assert "step 6/6" in progress, progress
        adapter = home / "adapters" / f"{name}.safetensors"
        assert adapter.is_file()
        assert is_sparse_delta_file(adapter)
        assert adapter.name in progress

        # The job ran `launch.py train sara` with the page's choices, and trained what the plan showed.
        run_dir = next((home / "runs").glob(f"*-sara-{name}"))
        job = json.loads((run_dir / "job.json").read_text())
        assert job["method"] == "sara"
        args = job["args"]
        assert args[args.index("--budget") + 1] == "1%"
        assert "--lr" not in args and "--rank" not in args and "--threshold" not in args
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
        planned = next(e for e in events if e.get("event") == "method")
        assert planned["selection"] == _plan(page)


def test_the_new_run_form_survives_a_refresh(browser, default_model_dir, tmp_path):
    with running_studio(default_model_dir, tmp_path / "outputs") as url:
        page = open_tab(browser, url, "Train", width=1500, height=1400)
        page.locator("#train-method label", has_text="SaRA").click()
        page.locator("#train-sara").wait_for(state="visible", timeout=10_000)
        page.locator("#train-trigger textarea, #train-trigger input").first.fill("zzz")
        type_number(page, "train-steps", 77)
        _type_budget(page, "3%")
        page.wait_for_timeout(1000)  # the browser keeps the form on every change
        page.reload()
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-sara").wait_for(state="visible", timeout=15_000)  # the method came back, with its fields
        page.wait_for_function("document.querySelector('#train-steps input')?.value === '77'", timeout=15_000)
        assert page.locator("#train-trigger textarea, #train-trigger input").first.input_value() == "zzz"
        budget = page.locator("#train-sara-budget textarea, #train-sara-budget input").first.input_value()
        assert budget == "3%"
        assert not page.locator("#train-lora-rank").is_visible()
        page.screenshot(path=str(tmp_path / "form-after-refresh.png"), full_page=True)
