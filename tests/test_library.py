import pytest

from pipelines.adapter_files import load_lora, save_lora
from pipelines.errors import UserError
from pipelines.library import export_adapter, import_adapter, list_adapters
from pipelines.loading import load_model
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
