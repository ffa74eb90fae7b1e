"""The Train tab's view of a run, through the page: the loss plot with its smoothed and validation lines and the
learning-rate curve, *Sample now* and *Extend by N steps* on a finished run (enabled only where they can act). The
continuation's weights are tested against one longer run in tests/test_jobs.py; here the page's wiring."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import MICRO_MODEL, fill_train_form, open_tab, running_studio
from trainers.events import read_events

pytest.importorskip("playwright")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (MICRO_MODEL / "model_index.json").is_file(), reason="micro base model not shipped")]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "training_view"


def _progress(page, name: str, text: str, timeout: float) -> None:
    page.wait_for_function(f"(t => t.includes({json.dumps(name)}) && t.includes({json.dumps(text)}))"
                           "(document.querySelector('#train-progress-box')?.innerText ?? '')", timeout=timeout)


def test_the_training_view_plots_extends_and_samples_a_finished_run(browser, tmp_path, monkeypatch):
    from training_data import draw_dataset

    home = tmp_path / "home"
    monkeypatch.setenv("ATELIER_HOME", str(home))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    data = draw_dataset(tmp_path / "circles", n=4)
    name = f"view-{int(time.time())}"
    with running_studio(MICRO_MODEL, tmp_path / "outputs") as url:
        page = open_tab(browser, url, "Train", width=1500, height=1500)
        assert page.locator("#train-sample-now button, button#train-sample-now").first.is_disabled()
        fill_train_form(page, data, steps=12, images=4, name=name, batch=2)
        page.locator("#train-ckpt-every input").fill("6")
        page.locator("#train-prompts textarea").fill("sks a red circle")
        page.locator("#train-validation textarea, #train-validation input").first.fill("0.5")
        page.locator("#train-start").click()
        _progress(page, name, "step 12/12", 300_000)
        _progress(page, name, "done", 120_000)
        page.wait_for_function("!document.querySelector('#train-extend')?.disabled", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "01-done.png"), full_page=True)
        run = next((home / "runs").glob(f"*-lora-{name}"))
        validation = [e["step"] for e in read_events(run) if e["event"] == "validation"]
        assert validation == [0, 6, 12], validation  # base model, the checkpoint, the end
        legend = page.locator("#train-loss").inner_text()
        assert "loss" in legend and "smoothed" in legend, legend
        assert "validation loss" in page.locator("#train-val-plot").inner_text()
        assert "lr" in page.locator("#train-lr-plot").inner_text()

        page.locator("#train-extend-by input").fill("4")
        page.locator("#train-extend").click()
        _progress(page, name, "step 16/16", 300_000)
        _progress(page, name, "done", 120_000)
        samples_before = sum(1 for e in read_events(run) if e["event"] == "sample")
        page.wait_for_function("!document.querySelector('#train-sample-now')?.disabled", timeout=30_000)
        page.locator("#train-sample-now").click()
        deadline = time.time() + 240
        while time.time() < deadline and sum(1 for e in read_events(run) if e["event"] == "sample") == samples_before:
            time.sleep(1)
        _progress(page, name, "done", 120_000)
        page.wait_for_timeout(2500)  # a tick of the page's timer shows the new preview
        page.screenshot(path=str(ARTIFACTS / "02-extended-and-sampled.png"), full_page=True)
    events = list(read_events(run))
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 17))
    samples = [e["step"] for e in events if e["event"] == "sample" and not e.get("base")]
    assert samples[-2:] == [16, 16], samples  # the extended run's end, then Sample now's
