"""Adapter files: both formats load in diffusers' own loader and match our merge; kohya import; metadata; errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.adapter_files import (LoraAdapter, LoraLayer, check_base, export_lora, load_lora, lora_metadata,
                                     save_lora)
from pipelines.errors import UserError
from pipelines.loading import load_model
from pipelines.lora import apply_loras, merge_lora, remove_loras, unmerge_lora

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_adapter(pipe, seed: int, rank: int = 4, alpha: float = 2.0, text_encoder: bool = True) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    components = [("unet", UNET_TARGETS)] + ([("text_encoder", TE_TARGETS)] if text_encoder else [])
    for component, targets in components:
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                out_f, in_f = module.weight.shape
                layers[f"{component}.{name}"] = LoraLayer(
                    down=torch.randn(rank, in_f, generator=g) * 0.3,
                    up=torch.randn(out_f, rank, generator=g) * 0.3, alpha=alpha)
    meta = lora_metadata(method="lora", base_fingerprint="f" * 16, trigger_words=["sks"], rank=rank, alpha=alpha,
                         settings={"steps": 1}, base_model_name="tiny", title="test")
    return LoraAdapter(layers=layers, metadata=meta)


def image(pipe, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, generator=g, output_type="np").images[0]


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_loader_matches_our_merge(model, tmp_path, fmt):
    pipe = model.pipe
    adapter = random_adapter(pipe, seed=1)
    path = save_lora(adapter, tmp_path / f"a.{fmt}.safetensors", format=fmt)
    base = image(pipe)
    pipe.load_lora_weights(str(path))  # diffusers' own loader, straight from our file
    theirs = image(pipe)
    pipe.unload_lora_weights()
    merge_lora(pipe, adapter)
    ours = image(pipe)
    unmerge_lora(pipe, adapter)
    assert np.abs(theirs - base).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(theirs, ours, atol=2e-4)


def test_kohya_file_as_kohya_writes_it_imports(model, tmp_path):
    pipe = model.pipe
    g = torch.Generator().manual_seed(5)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te_name = "text_model.encoder.layers.1.self_attn.v_proj"  # kohya's name, whatever transformers is installed
    q = pipe.unet.get_submodule(name)
    v = pipe.text_encoder.get_submodule("encoder.layers.1.self_attn.v_proj")
    tensors = {
        f"lora_unet_{name.replace('.', '_')}.lora_down.weight": torch.randn(8, q.in_features, generator=g),
        f"lora_unet_{name.replace('.', '_')}.lora_up.weight": torch.randn(q.out_features, 8, generator=g),
        f"lora_unet_{name.replace('.', '_')}.alpha": torch.tensor(4.0),
        f"lora_te_{te_name.replace('.', '_')}.lora_down.weight": torch.randn(8, v.in_features, generator=g),
        f"lora_te_{te_name.replace('.', '_')}.lora_up.weight": torch.randn(v.out_features, 8, generator=g),
        f"lora_te_{te_name.replace('.', '_')}.alpha": torch.tensor(8.0),
    }
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "8"})
    adapter = load_lora(path, pipe)
    key = f"lora_unet_{name.replace('.', '_')}"
    expected = tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"] * (4.0 / 8)
    torch.testing.assert_close(adapter.layers[f"unet.{name}"].delta(), expected)
    assert adapter.layers[f"text_encoder.{te_name}"].alpha == 8.0
    with pytest.raises(UserError, match="needs the base model"):
        load_lora(path)


def test_round_trips_preserve_delta(model, tmp_path):
    pipe = model.pipe
    adapter = random_adapter(pipe, seed=2)
    d = save_lora(adapter, tmp_path / "a.safetensors", format="diffusers")
    k = export_lora(d, tmp_path / "a.kohya.safetensors", "kohya", pipe)
    back = export_lora(k, tmp_path / "b.safetensors", "diffusers", pipe)
    again = load_lora(back, pipe)
    assert again.layers.keys() == adapter.layers.keys()
    for name, layer in adapter.layers.items():
        torch.testing.assert_close(again.layers[name].delta(), layer.delta(), rtol=1e-5, atol=1e-6)
    with safe_open(str(k), "pt") as fh:
        alphas = [key for key in fh.keys() if key.endswith(".alpha")]
        assert alphas and fh.get_tensor(alphas[0]).item() == 2.0  # a real alpha, not baked into up


def test_strengths_and_several_adapters(model, tmp_path):
    pipe = model.pipe
    a, b = random_adapter(pipe, seed=3, text_encoder=False), random_adapter(pipe, seed=4, text_encoder=False)
    apply_loras(pipe, [(a, 0.5), (b, 0.7)])
    together = image(pipe)
    remove_loras(pipe)
    base = image(pipe)
    merge_lora(pipe, a, 0.5)
    merge_lora(pipe, b, 0.7)
    merged = image(pipe)
    unmerge_lora(pipe, b, 0.7)
    unmerge_lora(pipe, a, 0.5)
    np.testing.assert_allclose(together, merged, atol=2e-4)
    np.testing.assert_allclose(image(pipe), base, atol=1e-5)


def test_merge_then_unmerge_restores_weights(model):
    pipe = model.pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adapter = random_adapter(pipe, seed=6)
    merge_lora(pipe, adapter, 0.8)
    changed = sum(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    unmerge_lora(pipe, adapter, 0.8)
    assert changed > 0
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_metadata_is_readable_by_other_tools(model, tmp_path):
    path = save_lora(random_adapter(model.pipe, seed=7), tmp_path / "m.safetensors", format="kohya")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["atelier.method"] == "lora" and meta["atelier.trigger_words"] == "sks"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["atelier.format"] == "kohya"


def test_base_model_check(model):
    adapter = random_adapter(model.pipe, seed=8)
    assert "another base model" in check_base(adapter, model.fingerprint)
    with pytest.raises(UserError, match="another base model"):
        check_base(adapter, model.fingerprint, strict=True)
    adapter.metadata["atelier.base_fingerprint"] = model.fingerprint
    assert check_base(adapter, model.fingerprint) is None


def test_bad_files_are_refused_in_one_line(model, tmp_path):
    good = save_lora(random_adapter(model.pipe, seed=9), tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "truncated.safetensors": (data[: len(data) // 2], "truncated"),
        "zero.safetensors": (b"", "empty"),
        "pickle.safetensors": (pickle.dumps({"a": 1}), "not a valid .safetensors"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message):
            load_lora(tmp_path / name, model.pipe)
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a LoRA file"):
        load_lora(tmp_path / "plain.safetensors", model.pipe)
    (tmp_path / "x.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match="only .safetensors"):
        load_lora(tmp_path / "x.ckpt")
    other = {f"lora_unet_not_a_layer_{i}.lora_down.weight": torch.zeros(1, 2) for i in range(2)}
    other.update({f"lora_unet_not_a_layer_{i}.lora_up.weight": torch.zeros(2, 1) for i in range(2)})
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="do not exist in this model"):
        load_lora(tmp_path / "other.safetensors", model.pipe)
