import pytest

from adapters.lora.files import load_lora, save_lora
from core.errors import UserError
from adapters.library import export_adapter, import_adapter, list_adapters
from models.loading import load_model
from test_adapter_files import random_adapter


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
    assert exported.name == "mine.diffusers.safetensors"
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
    exported = export_adapter(library_path(labels[1], folder), "kohya", folder, model.pipe)
    assert exported.parent == folder and not list(EXAMPLE_CONCEPTS.glob("*.kohya.safetensors"))  # assets untouched
