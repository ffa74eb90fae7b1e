"""A user makes a Break-for-Make adapter from the page: fills the wizard's three steps, is told what is wrong before
anything is queued, then gets three chained jobs and the combined file in the adapters folder."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import open_tab, running_studio

pytest.importorskip("playwright")
pytestmark = pytest.mark.browser


def _fill(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.press("Tab")


def _b4m_runs(home: Path, name: str) -> list[Path]:
    return sorted((home / "runs").glob(f"*-b4m-*-{name}")) if (home / "runs").is_dir() else []


def _done_time(run_dir: Path) -> float:
    from trainers.events import read_events

    return next(e["time"] for e in read_events(run_dir) if e.get("event") == "done")


def test_b4m_wizard_from_the_page(browser, tiny_model_dir, data, tmp_path):
    from trainers.break_for_make import read_plp_file
    from trainers.jobs import job_info

    home = Path(os.environ["ATELIER_HOME"])
    name = f"b4m-{int(time.time())}"
    with running_studio(tiny_model_dir, tmp_path / "outputs") as url:
        page = open_tab(browser, url, "Train", width=1500, height=1400)
        assert not page.locator("#b4m-make").is_visible()  # closed until asked for
        page.locator("#train-b4m").get_by_text("Break-for-Make: content + style").click()
        page.locator("#b4m-make").wait_for(state="visible", timeout=10_000)
        # Not the micro model: its scene generator's sets are not offered, class images from the model come first.
        assert page.locator("#b4m-aux-source label", has_text="Micro-world").count() == 0
        assert not page.locator("#b4m-aux-microworld").is_visible()
        assert page.locator("#b4m-aux-prompts").is_visible()
        assert not page.locator("#b4m-aux-folders").is_visible()

        # Only the chosen source's fields show.
        page.locator("#b4m-aux-source label", has_text="My folders").click()
        page.locator("#b4m-aux-folders").wait_for(state="visible", timeout=10_000)
        page.locator("#b4m-aux-prompts").wait_for(state="hidden", timeout=10_000)
        page.locator("#b4m-aux-source label", has_text="Class images").click()
        page.locator("#b4m-aux-prompts").wait_for(state="visible", timeout=10_000)
        page.locator("#b4m-aux-folders").wait_for(state="hidden", timeout=10_000)
        page.locator("#b4m-aux-source label", has_text="My folders").click()
        page.locator("#b4m-aux-folders").wait_for(state="visible", timeout=10_000)

        _fill(page, "b4m-style-folder", str(data))
        _fill(page, "b4m-aux-styles", str(data))
        _fill(page, "b4m-aux-contents", str(data))
        _fill(page, "b4m-steps", "2")
        _fill(page, "b4m-combine-steps", "1")
        _fill(page, "b4m-rank", "2")
        _fill(page, "b4m-name", name)
        _fill(page, "b4m-subjects", "a red circle")

        # No content folder yet: a readable toast, and nothing queued.
        page.locator("#b4m-make").click()
        toast = page.locator(".toast-body", has_text="content images")
        toast.wait_for(state="visible", timeout=15_000)
        assert "Traceback" not in toast.inner_text()
        page.wait_for_timeout(600)  # the toast fades in
        page.screenshot(path=str(tmp_path / "b4m-error.png"))
        assert page.locator("#b4m-status textarea").input_value() == ""
        assert _b4m_runs(home, name) == []
        page.locator(".toast-close").first.click()  # out of the screenshot's way

        _fill(page, "b4m-content-folder", str(data))
        page.locator("#train-b4m").scroll_into_view_if_needed()
        shot = tmp_path / "b4m-wizard.png"
        page.screenshot(path=str(shot), full_page=True)
        shutil.copy(shot, "/tmp/b4m_wizard.png")

        started = time.perf_counter()
        page.locator("#b4m-make").click()
        page.wait_for_function("document.querySelector('#b4m-status textarea')?.value.includes('Queued 3 runs')",
                               timeout=30_000)
        status = page.locator("#b4m-status textarea").input_value()
        runs = _b4m_runs(home, name)
        assert len(runs) == 3 and all(r.name in status for r in runs), (status, runs)
        assert "waits for both, then draws the 4-image preview grid" in status
        content_run, style_run, combine_run = (next(r for r in runs if f"-b4m-{stage}-" in r.name)
                                               for stage in ("content", "style", "combine"))
        # Right after the click the stage-1 runs have seconds of work ahead: the combine is queued behind both.
        assert job_info(combine_run).message == f"waits for {content_run.name}, {style_run.name}"
        page.wait_for_function(f"document.querySelector('#train-progress-box')?.innerText.includes('{content_run.name}')",
                               timeout=30_000)  # the Runs panel follows the content run

        combined = home / "adapters" / f"{name}.safetensors"
        deadline = time.time() + 240
        while not combined.is_file() and time.time() < deadline:
            time.sleep(1)
        print(f"Break-for-Make 2 + 2 + 1 steps: {time.perf_counter() - started:.1f} s from click to the file")
        logs = {r.name: (r / "process.log").read_text(errors="replace")[-1500:] for r in runs
                if (r / "process.log").is_file()}
        assert combined.is_file(), logs
        made = read_plp_file(combined)
        assert (made.stage, made.content_trigger, made.style_trigger) == ("combine", "sks", "w@z")
        assert made.rank == 2

        # The combine started only once both stage-1 runs were done, and asked for the content × style grid.
        job = json.loads((combine_run / "job.json").read_text())
        assert job["started"] >= max(_done_time(content_run), _done_time(style_run))
        args = job["args"]
        prompts = [args[i + 1] for i, a in enumerate(args) if a == "--sample-prompt"]
        assert prompts == ["sks w@z a red circle", "sks a red circle", "w@z a red circle", "a red circle"]
        for stage_run in runs:
            stage_args = json.loads((stage_run / "job.json").read_text())["args"]
            assert stage_args[stage_args.index("--model") + 1] == str(tiny_model_dir)
        page.locator("#train-runs input").click()
        page.get_by_role("option", name=combine_run.name).click()
        page.wait_for_function(f"(t => t.includes('{combine_run.name}') && t.includes('done'))"
                               "(document.querySelector('#train-progress-box')?.innerText ?? '')", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('#train-samples img').length >= 4", timeout=30_000)
        page.screenshot(path=str(tmp_path / "b4m-done.png"), full_page=True)
