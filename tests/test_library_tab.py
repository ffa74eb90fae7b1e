"""The Library tab: export offered only in the formats an adapter has, rename, and delete after a confirmation;
shipped examples stay."""
from __future__ import annotations

import shutil

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from bad_inputs import good_tiny_lora
from conftest import start_studio
from core.safetensors_files import save_atomic


def test_library_rename_delete_and_export_formats(tiny_model_dir, bad_corpus, tmp_path, monkeypatch):
    home = tmp_path / "home"
    folder = home / "adapters"
    folder.mkdir(parents=True)
    shutil.copy(good_tiny_lora(bad_corpus), folder / "mine.safetensors")
    save_atomic({"vae.decoder.conv_out.lora_A.weight": torch.zeros(1, 4)}, folder / "mark.safetensors",
                {"atelier.method": "watermark"})  # read from its header only here
    monkeypatch.setenv("ATELIER_HOME", str(home))
    proc, url = start_studio(tiny_model_dir, home / "outputs")
    try:
        client = Client(url, verbose=False)
        client.predict(api_name="/library_list")  # the page's load: the table and the adapter list
        fmt, note = client.predict("mark.safetensors", api_name="/on_chosen")
        assert fmt.get("interactive") is False and "cannot be exported" in note
        fmt, note = client.predict("mine.safetensors", api_name="/on_chosen")
        assert fmt["choices"] and note == ""

        client.predict("mine.safetensors", "star v1", api_name="/on_rename")
        assert (folder / "star-v1.safetensors").is_file() or (folder / "star v1.safetensors").is_file()
        renamed = next(p.name for p in folder.iterdir() if p.name.startswith("star"))
        with pytest.raises(AppError, match="exists already"):
            client.predict(renamed, "mark", api_name="/on_rename")
        with pytest.raises(AppError, match="shipped examples stay"):
            client.predict("heart.safetensors (example)", api_name="/on_delete")

        question = client.predict(renamed, api_name="/on_delete")  # (the confirm row is layout: not in the answer)
        assert "Only this file" in str(question)
        assert (folder / renamed).is_file()  # asking deletes nothing
        client.predict(renamed, api_name="/on_confirm")
        assert sorted(p.name for p in folder.iterdir()) == ["mark.safetensors"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.browser
def test_lists_follow_the_adapters_folder_without_a_reload(tiny_model_dir, bad_corpus, tmp_path, monkeypatch, browser):
    """A file that lands in the adapters folder (a run ending, an import elsewhere) shows in the Library table and in
    Generate's adapter list of an open page; one that goes, goes."""
    from conftest import open_tab, running_studio

    home = tmp_path / "home"
    folder = home / "adapters"
    folder.mkdir(parents=True)
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
