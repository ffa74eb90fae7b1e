import json
import os
import time

import pytest
import torch
from PIL import Image

from adapters.lora.files import load_lora, save_lora
from core.errors import UserError
from adapters.library import (delete_adapter, entry_details, export_adapter, import_adapter, library_entries,
                              list_adapters, rename_adapter)
from core.safetensors_files import add_metadata, read_metadata, save_atomic
from models.loading import load_model
from test_adapter_files import random_adapter
from trainers.events import EventLog
from core.run_provenance import CREATED_KEY, RUN_DIR_KEY, STEPS_KEY


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_list_import_export(model, tmp_path):
    folder = tmp_path / "adapters"
    adapter = random_adapter(model.pipe, seed=1)
    adapter.metadata["atelier.base_fingerprint"] = model.fingerprint
    upload = save_lora(adapter, tmp_path / "upload" / "mine.safetensors", format="kohya")
    first = import_adapter(upload, folder, model.pipe, original_name="../../mine.safetensors")
    second = import_adapter(upload, folder, model.pipe, original_name="mine.safetensors")
    assert first == folder / "mine.safetensors" and second == folder / "mine-1.safetensors"  # never overwritten
    (folder / "broken.safetensors").write_bytes(b"\x00" * 5)
    entries, problems = list_adapters(folder, model.fingerprint)
    assert [e.name for e in entries] == ["mine-1.safetensors", "mine.safetensors"]
    assert entries[0].matches_model is True and entries[0].triggers == "sks" and entries[0].format == "kohya"
    assert len(problems) == 1 and "broken.safetensors" in problems[0]
    exported = export_adapter(first, "diffusers", folder, model.pipe)
    assert exported == folder / "exports" / "mine-diffusers.safetensors"
    again = load_lora(exported)
    for name, layer in load_lora(first, model.pipe).layers.items():
        assert (again.layers[name].delta() - layer.delta()).abs().max() < 1e-5


def test_import_refuses_what_it_cannot_read(model, tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError):
        import_adapter(bad, tmp_path / "adapters", model.pipe)
    assert not (tmp_path / "adapters" / "x.safetensors").exists()
    with pytest.raises(UserError, match="only .safetensors"):
        import_adapter(bad, tmp_path / "adapters", model.pipe, original_name="x.ckpt")


def test_the_library_lists_the_shipped_example_concepts_after_the_users_adapters(default_model_dir, tmp_path):
    from adapters.library import EXAMPLE_CONCEPTS, library_entries, library_label, library_path

    shipped = sorted(p.name for p in EXAMPLE_CONCEPTS.glob("*.safetensors"))
    if not shipped:
        pytest.skip("no shipped example concepts in this checkout")
    model = load_model(default_model_dir)
    folder = tmp_path / "adapters"
    save_lora(random_adapter(model.pipe, seed=2), folder / "mine.safetensors")
    entries, problems = library_entries(folder, model.fingerprint)
    labels = [library_label(e) for e in entries]
    assert not problems and labels == ["mine.safetensors", *(f"{name} (example)" for name in shipped)]
    assert all(e.matches_model for e in entries[1:])  # the examples were trained on the shipped micro model
    assert library_path(labels[1], folder) == EXAMPLE_CONCEPTS / shipped[0]
    assert library_path("../../x.safetensors (example)", folder) == EXAMPLE_CONCEPTS / "x.safetensors"  # names only
    example = library_path(labels[1], folder)
    before = set(EXAMPLE_CONCEPTS.iterdir())
    exported = export_adapter(example, "kohya" if entries[1].format != "kohya" else "diffusers", folder, model.pipe)
    assert exported.parent == folder / "exports" and set(EXAMPLE_CONCEPTS.iterdir()) == before  # assets untouched
    # named apart from an own file of the same name, and listed with the example
    assert exported.name.startswith(f"{example.stem}-example-")
    again, _ = library_entries(folder, model.fingerprint)
    assert len(again) == len(entries) and list(again[1].exports.values()) == [exported]


# --- where an entry came from, and its formats ---------------------------------------------------------------------
def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_an_adapter_from_a_run_shows_its_date_steps_dataset_run_and_last_preview(model, tmp_path):
    """The keys the run loop stamps (core.run_provenance) and its event log (written with the trainers' own
    EventLog): created, steps, run folder and thumbnail come from the run, dataset and base model from the file."""
    folder, run = tmp_path / "adapters", tmp_path / "runs" / "20261208-012259-lora-star"
    adapter = random_adapter(model.pipe, seed=3)
    adapter.metadata["atelier.settings"] = json.dumps({"data": str(tmp_path / "datasets" / "star"), "steps": 50})
    path = save_lora(adapter, folder / "star.safetensors")
    add_metadata(path, {RUN_DIR_KEY: str(run.resolve()), STEPS_KEY: "40", CREATED_KEY: "2026-12-08T01:22:59"})
    log = EventLog(run)
    log.write("sample", step=0, paths=["samples/base-000.png"], prompts=["a star"], base=True)
    log.write("sample", step=20, paths=["samples/step-0000020-000.png"], prompts=["a star"])
    log.write("sample", step=40, paths=["samples/step-0000040-000.png", "samples/step-0000040-001.png"],
              prompts=["a star", "a ring"])
    log.write("done", step=40)
    _png(run / "samples" / "base-000.png", "white")
    _png(run / "samples" / "step-0000020-000.png", "red")
    newest = _png(run / "samples" / "step-0000040-001.png", "blue")  # the newest preview's first image is missing
    with (run / "events.jsonl").open("a") as fh:
        fh.write('{"event": "sample", "paths": ["samples/torn')  # a line still being written

    entries, problems = list_adapters(folder, model.fingerprint)
    assert not problems and len(entries) == 1
    entry = entries[0]
    assert (entry.created, entry.created_from, entry.created_label()) == ("2026-12-08T01:22:59", "run",
                                                                          "2026-12-08 01:22")
    assert entry.steps == "40"  # the run's own count, not the 50 it was set to
    assert (entry.method, entry.dataset_name, entry.base_model, entry.triggers) == ("lora", "star", "tiny", "sks")
    assert entry.run_dir == run.resolve() and entry.run_name == "20261208-012259-lora-star"
    assert entry.thumbnail == newest
    details = entry_details(entry)
    assert details["run"] == entry.run_name and details["thumbnail"] == str(newest) and details["steps"] == "40"

    newest.unlink()  # the newest preview gone: the one before it
    assert list_adapters(folder)[0][0].thumbnail == run / "samples" / "step-0000020-000.png"
    (run / "samples" / "step-0000020-000.png").unlink()  # only the base model's row left: not the adapter's picture
    assert list_adapters(folder)[0][0].thumbnail is None


def test_an_adapter_without_a_run_falls_back_to_what_the_file_says(model, tmp_path):
    folder = tmp_path / "adapters"
    adapter = random_adapter(model.pipe, seed=4)  # modelspec.date and atelier.settings {"steps": 1, ...}
    save_lora(adapter, folder / "a-lora.safetensors")
    meta = read_metadata(folder / "a-lora.safetensors")
    save_atomic({"vae.decoder.conv_out.lora_A.weight": torch.zeros(1, 4)}, folder / "b-mark.safetensors",
                {"atelier.method": "watermark",
                 "atelier.settings": json.dumps({"max_steps": 7, "images": "/home/me/pictures/cats"})})
    save_atomic({"vae.decoder.conv_out.lora_A.weight": torch.zeros(1, 4)}, folder / "c-bare.safetensors", {})
    when = time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1))
    os.utime(folder / "c-bare.safetensors", (when, when))

    lora, mark, bare = list_adapters(folder, model.fingerprint)[0]
    assert (lora.created, lora.created_from) == (meta["modelspec.date"], "modelspec.date")
    assert lora.steps == "1" and lora.dataset == "" and lora.base_model == "tiny"
    assert (mark.steps, mark.dataset_name, mark.created_from) == ("7", "cats", "file time")
    assert (bare.created, bare.created_from) == ("2025-03-04T05:06:07", "file time")
    assert bare.steps == "" and bare.dataset == "" and bare.base_model == ""
    for entry in (lora, mark, bare):
        assert entry.run_dir is None and entry.run_name == "" and entry.thumbnail is None


def test_an_export_goes_to_exports_and_shows_as_a_format_of_its_entry(model, tmp_path):
    """One entry per adapter (the Library's and Generate's lists alike), its formats listed; rename and delete take
    the exported copies along."""
    folder = tmp_path / "adapters"
    mine = save_lora(random_adapter(model.pipe, seed=5), folder / "mine.safetensors", format="diffusers")
    with pytest.raises(UserError, match="diffusers file already"):
        export_adapter(mine, "diffusers", folder, model.pipe)
    copy = export_adapter(mine, "kohya", folder, model.pipe)
    assert copy == folder / "exports" / "mine-kohya.safetensors"
    assert read_metadata(copy)["atelier.format"] == "kohya"
    assert [p.name for p in folder.glob("*.safetensors")] == ["mine.safetensors"]  # nothing new beside it

    generate_list, _ = list_adapters(folder)  # what Generate and Compose list: the folder's own files
    assert [e.name for e in generate_list] == ["mine.safetensors"]
    entries, _ = library_entries(folder, model.fingerprint)
    own = [e for e in entries if e.path.parent == folder]
    assert [e.name for e in own] == ["mine.safetensors"]
    assert own[0].exports == {"kohya": copy}
    assert own[0].formats_label() == "diffusers; kohya → exports/mine-kohya.safetensors"
    assert export_adapter(mine, "kohya", folder, model.pipe) == copy  # again: the same copy, replaced

    os.utime(mine, (time.time() + 60, time.time() + 60))  # the adapter written again since (a new run's file)
    assert "older than the adapter" in library_entries(folder)[0][0].formats_label()

    renamed = rename_adapter("mine.safetensors", "star", folder)
    assert renamed == folder / "star.safetensors" and not copy.exists()
    assert (folder / "exports" / "star-kohya.safetensors").is_file()
    assert library_entries(folder)[0][0].exports == {"kohya": folder / "exports" / "star-kohya.safetensors"}

    removed = delete_adapter("star.safetensors", folder)
    assert removed == [renamed, folder / "exports" / "star-kohya.safetensors"]
    assert not any(folder.rglob("*.safetensors"))
