"""The Library tab: a chosen adapter's card (its run's last preview, its run), export offered only in the formats an
adapter has (written to exports/, shown as the entry's format), rename, and delete after a confirmation; shipped
examples stay."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from bad_inputs import good_tiny_lora
from conftest import start_studio
from core.safetensors_files import add_metadata, save_atomic
from trainers.events import EventLog
from core.run_provenance import CREATED_KEY, RUN_DIR_KEY, STEPS_KEY

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def run_made_adapter(source: Path, folder: Path, run: Path, name: str = "star.safetensors") -> Path:
    """``source`` as a run would have left it: stamped with its run folder, steps and date, and the run folder with
    a base-model preview and a preview at step 40 (the thumbnail: blue)."""
    adapter = shutil.copy(source, folder / name)
    add_metadata(adapter, {RUN_DIR_KEY: str(run), STEPS_KEY: "40", CREATED_KEY: "2026-12-08T01:22:59",
                           "atelier.settings": json.dumps({"data": "/home/me/datasets/stars", "steps": 40})})
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (64, 64), "white").save(run / "samples" / "base-000.png")
    Image.new("RGB", (64, 64), (40, 90, 220)).save(run / "samples" / "step-0000040-000.png")
    log = EventLog(run)
    log.write("sample", step=0, paths=["samples/base-000.png"], prompts=["a star"], base=True)
    log.write("sample", step=40, paths=["samples/step-0000040-000.png"], prompts=["a star"])
    return adapter


def test_library_rename_delete_and_export_formats(tiny_model_dir, bad_corpus, tmp_path, monkeypatch):
    home = tmp_path / "home"
    folder = home / "adapters"
    folder.mkdir(parents=True)
    shutil.copy(good_tiny_lora(bad_corpus), folder / "mine.safetensors")
    save_atomic({"vae.decoder.conv_out.lora_A.weight": torch.zeros(1, 4)}, folder / "mark.safetensors",
                {"atelier.method": "watermark"})  # read from its header only here
    run = home / "runs" / "20261208-012259-lora-star"
    run_made_adapter(good_tiny_lora(bad_corpus), folder, run)
    monkeypatch.setenv("ATELIER_HOME", str(home))
    proc, url = start_studio(tiny_model_dir, home / "outputs")
    try:
        client = Client(url, verbose=False)
        client.predict(api_name="/library_list")  # the page's load: the table and the adapter list
        fmt, thumb, details = client.predict("mark.safetensors", api_name="/on_chosen")
        assert fmt.get("interactive") is False and "cannot be exported" in details
        assert thumb == {"__type__": "update", "value": None, "visible": False}  # no run: no thumbnail shown
        assert "**Run** none recorded" in details and "(file time)" in details
        fmt, thumb, details = client.predict("mine.safetensors", api_name="/on_chosen")
        assert fmt["choices"] == [["kohya", "kohya"]] and fmt["value"] == "kohya"  # not the format it is in
        assert "cannot be exported" not in details

        # the card of a run's adapter: its last preview (not the base model's) and its run, by the Runs list's name
        fmt, thumb, details = client.predict("star.safetensors", api_name="/on_chosen")
        assert thumb["visible"] is True and Image.open(thumb["value"]).getpixel((3, 3)) == (40, 90, 220)
        assert f"**Run** `{run.name}` (Train tab → Runs)" in details
        for shown in ("**Created** 2026-12-08 01:22", "**steps** 40", "**Dataset** `stars`", "**Trigger** `sks`",
                      "`lora`"):
            assert shown in details, (shown, details)

        # export: into exports/, one row for the adapter with both its formats
        wrote, table, _, _, status, _, details = client.predict("mine.safetensors", "kohya", api_name="/on_export")
        copy = folder / "exports" / "mine-kohya.safetensors"
        assert copy.is_file() and Path(wrote).name == copy.name and "exports/mine-kohya.safetensors" in status
        rows = {row[0]: row for row in table["data"]}
        assert "mine-kohya.safetensors" not in rows and not (folder / "mine-kohya.safetensors").exists()
        assert rows["mine.safetensors"][table["headers"].index("format")] == \
            "diffusers; kohya → exports/mine-kohya.safetensors"
        assert rows["star.safetensors"][table["headers"].index("created")] == "2026-12-08 01:22"
        assert rows["star.safetensors"][table["headers"].index("steps")] == "40"
        assert "**Formats** diffusers; kohya → `exports/mine-kohya.safetensors`" in details

        client.predict("mine.safetensors", "star v1", api_name="/on_rename")
        assert (folder / "star-v1.safetensors").is_file() or (folder / "star v1.safetensors").is_file()
        renamed = next(p.name for p in folder.iterdir() if p.name.startswith("star") and p.name != "star.safetensors")
        assert not copy.exists()
        assert (folder / "exports" / renamed.replace(".safetensors", "-kohya.safetensors")).is_file()  # moved along
        with pytest.raises(AppError, match="exists already"):
            client.predict(renamed, "mark", api_name="/on_rename")
        with pytest.raises(AppError, match="shipped examples stay"):
            client.predict("heart.safetensors (example)", api_name="/on_delete")

        question = client.predict(renamed, api_name="/on_delete")  # (the confirm row is layout: not in the answer)
        assert "its exported copy" in str(question) and "-kohya.safetensors" in str(question)
        assert (folder / renamed).is_file()  # asking deletes nothing
        client.predict(renamed, api_name="/on_confirm")
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["mark.safetensors", "star.safetensors"]
        assert not any((folder / "exports").iterdir())  # the exported copy went with it
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.browser
def test_lists_follow_the_adapters_folder_without_a_reload(tiny_model_dir, bad_corpus, tmp_path, monkeypatch, browser):
    """A file that lands in the adapters folder (a run ending, an import elsewhere) shows in the Library table and in
    Generate's adapter list of an open page; one that goes, goes. A run's adapter, chosen, shows its card: the run's
    last preview and the run's name (screenshot: tests/artifacts/library-card.png)."""
    from conftest import open_tab, pick, running_studio

    home = tmp_path / "home"
    folder = home / "adapters"
    folder.mkdir(parents=True)
    run = home / "runs" / "20261208-012259-lora-star"
    run_made_adapter(good_tiny_lora(bad_corpus), folder, run)
    monkeypatch.setenv("ATELIER_HOME", str(home))
    with running_studio(tiny_model_dir, home / "outputs") as url:
        page = open_tab(browser, url, "Library")
        page.wait_for_function("document.querySelector('#lib-table')?.innerText.includes('heart')", timeout=30_000)
        assert "fresh-one" not in page.locator("#lib-table").inner_text()
        shutil.copy(good_tiny_lora(bad_corpus), folder / "fresh-one.safetensors")
        page.wait_for_function("document.querySelector('#lib-table')?.innerText.includes('fresh-one')", timeout=20_000)
        page.get_by_role("tab", name="Generate").click()
        page.locator("#gen-loras").click()  # the adapters accordion
        page.locator("#gen-lora-0 input").click()
        page.get_by_role("option", name="fresh-one.safetensors").wait_for(timeout=20_000)
        page.keyboard.press("Escape")
        page.screenshot(path=str(tmp_path / "live-list.png"), full_page=True)
        (folder / "fresh-one.safetensors").unlink()
        page.get_by_role("tab", name="Library").click()
        page.wait_for_function("!document.querySelector('#lib-table')?.innerText.includes('fresh-one')",
                               timeout=20_000)

        assert page.locator("#lib-thumb").count() == 0 or not page.locator("#lib-thumb").is_visible()
        pick(page, "lib-chosen", "star.safetensors")
        page.wait_for_function(f"document.querySelector('#lib-details')?.innerText.includes('{run.name}')",
                               timeout=20_000)
        page.wait_for_function("(() => { const i = document.querySelector('#lib-thumb img'); "
                               "return i && i.complete && i.naturalWidth === 64; })()", timeout=20_000)
        card = page.locator("#lib-details").inner_text()
        for shown in ("Train tab → Runs", "2026-12-08 01:22", "40", "stars", "sks"):
            assert shown in card, (shown, card)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "library-card.png"), full_page=True)
        pick(page, "lib-chosen", "heart.safetensors (example)")  # no run: no thumbnail, the card says so
        page.wait_for_function("document.querySelector('#lib-details')?.innerText.includes('none recorded')",
                               timeout=20_000)
        page.wait_for_function("!document.querySelector('#lib-thumb img')", timeout=10_000)
