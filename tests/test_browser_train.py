"""A user trains a LoRA from the page: sees the arithmetic, starts, watches, stops, resumes; then uses it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import fill_train_form, open_tab, running_studio

pytestmark = pytest.mark.browser


def test_train_stop_resume_and_use_from_the_page(browser, default_model_dir, tmp_path):
    from pipelines.microworld.scenes import SceneConfig, restrict, write_dataset

    data = tmp_path / "data"  # a micro-world dataset of a novel shape, as a new user would make
    write_dataset(data, 6, seed=1, config=restrict(SceneConfig(), shape="star", objects=1))
    home = Path(os.environ["ATELIER_HOME"])
    with running_studio(default_model_dir, tmp_path / "outputs") as url:
        page = open_tab(browser, url, "Train", width=1500, height=1400)
        name = f"browser-{int(time.time())}"
        fill_train_form(page, data, steps=400, images=6, name=name)
        page.locator("#train-start").click()
        page.wait_for_function("document.querySelector('#train-progress-box').innerText.includes('running')",
                               timeout=60_000)
        page.wait_for_function(
            "(() => { const m = document.querySelector('#train-progress-box').innerText.match(/step (\\d+)\\//);"
            " return m && Number(m[1]) >= 3; })()", timeout=120_000)
        page.screenshot(path=str(tmp_path / "train-running.png"), full_page=True)
        page.locator("#train-stop").click()
        page.wait_for_function("document.querySelector('#train-progress-box').innerText.includes('stopped')",
                               timeout=120_000)
        page.screenshot(path=str(tmp_path / "train-stopped.png"), full_page=True)
        run_dir = next((home / "runs").glob(f"*{name}"))
        assert list((run_dir / "checkpoints").glob("step-*"))

        # A page refresh re-attaches to the run.
        page.reload()
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function("document.querySelector('#train-progress-box').innerText.includes('stopped')",
                               timeout=60_000)

        cfg = json.loads((run_dir / "config.json").read_text())  # finish soon after resuming
        stopped = int(page.locator("#train-progress-box").inner_text().split("step ")[1].split("/")[0])
        cfg["steps"] = stopped + 3
        (run_dir / "config.json").write_text(json.dumps(cfg))
        page.locator("#train-resume").click()
        page.wait_for_function("document.querySelector('#train-progress-box').innerText.includes('done')",
                               timeout=180_000)
        page.screenshot(path=str(tmp_path / "train-done.png"), full_page=True)
        adapter = home / "adapters" / f"{name}.safetensors"
        assert adapter.is_file()

        # The new adapter is in the Library and can be applied in the Generate tab.
        page.reload()
        page.get_by_role("tab", name="Library").click()
        page.wait_for_function(f"document.querySelector('#lib-table').innerText.includes('{name}')", timeout=30_000)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-loras").click()
        page.locator("#gen-lora-0 input").click()
        page.get_by_role("option", name=f"{name}.safetensors").click()
        page.locator("#gen-prompt textarea").fill("sks a red circle")
        page.locator("#gen-steps input[type=number]").fill("2")
        page.locator("#gen-run").click()
        page.wait_for_function("document.querySelector('#gen-status').innerText.includes('Saved')", timeout=60_000)
        assert f'Lora: "{name}:1"' in page.locator("#gen-info textarea").input_value()
        page.screenshot(path=str(tmp_path / "generate-with-lora.png"), full_page=True)
