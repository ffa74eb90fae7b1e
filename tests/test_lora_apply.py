"""Applying adapters: diffusers' own loader on our files matches our independent merge; strengths; several adapters;
merge/unmerge and removal give the base model back; fp16/bf16 weights; failures leave the model untouched.

Every test loads its own copy of the tiny model (the session ``tiny_model`` is shared and must stay clean).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.lora.files import LoraLayer, delta, load_lora, save_lora
from core.errors import UserError
from models.loading import load_model
from adapters.lora.apply import apply_loras, loaded_adapter_names, merge_lora, remove_loras, unmerge_lora

from test_adapter_files import random_adapter  # one helper for both files


def image(pipe, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe("a red circle", num_inference_steps=2, generator=g, output_type="np").images[0]


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.fixture
def pipe(tiny_model_dir):
    return load_model(tiny_model_dir).pipe


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_loader_on_our_file_matches_our_merge(pipe, tmp_path, fmt):
    adapter = random_adapter(pipe, seed=1)
    path = save_lora(adapter, tmp_path / f"a.{fmt}.safetensors", format=fmt)
    base = image(pipe)
    pipe.load_lora_weights(str(path))  # diffusers' own loader, straight from our file
    theirs = image(pipe)
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(image(pipe), base)
    merge_lora(pipe, adapter)
    ours = image(pipe)
    assert np.abs(theirs - base).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_kohya_file_as_kohya_writes_it_means_the_same_to_diffusers_and_us(pipe, tmp_path):
    """Conv (LoCon) layers, 1×1 proj_in, feed-forward and text-encoder MLP, per-module alpha, fp16: one alpha
    value here because diffusers' kohya import honours only the most common alpha."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in [(n, pipe.unet.get_submodule(n)) for n in (
            "down_blocks.1.resnets.0.conv1", "mid_block.attentions.0.proj_in", "up_blocks.1.resnets.1.conv2",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")]:
        w, stem = module.weight, "lora_unet_" + name.replace(".", "_")
        lead = (w.shape[0], 4) + ((1, 1) if w.dim() == 4 else ())
        tensors[f"{stem}.lora_down.weight"] = (torch.randn(4, *w.shape[1:], generator=g) * 0.2).half()
        tensors[f"{stem}.lora_up.weight"] = (torch.randn(*lead, generator=g) * 0.2).half()
        tensors[f"{stem}.alpha"] = torch.tensor(2.0).half()
    fc1 = pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1").weight
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(4, fc1.shape[1]).half()
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(fc1.shape[0], 4).half()
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(2.0).half()
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, str(path))
    base = image(pipe)
    pipe.load_lora_weights(str(path))
    theirs = image(pipe)
    pipe.unload_lora_weights()
    merge_lora(pipe, load_lora(path, pipe))
    assert np.abs(theirs - base).max() > 1e-2
    np.testing.assert_allclose(image(pipe), theirs, atol=1e-4)


def test_strength_scales_delta(pipe):
    adapter = random_adapter(pipe, seed=2)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    before = pipe.unet.get_submodule(name).weight.detach().clone()
    merge_lora(pipe, adapter, 0.5)
    after = pipe.unet.get_submodule(name).weight.detach()
    torch.testing.assert_close(after - before, 0.5 * delta(adapter.layers[f"unet.{name}"]), rtol=1e-4, atol=1e-6)


def test_strengths_and_several_adapters_through_diffusers(pipe):
    a, b = random_adapter(pipe, seed=3), random_adapter(pipe, seed=4, text_encoder=False)
    base = image(pipe)
    names = apply_loras(pipe, [(a, 0.5), (b, 0.7)])
    together = image(pipe)
    assert names == ["atelier_0", "atelier_1"] and loaded_adapter_names(pipe) == set(names)
    apply_loras(pipe, [(a, 0.5)], names=["atelier_0"])  # same name again: replaced, and b is inactive
    only_a = image(pipe)
    remove_loras(pipe)
    assert not loaded_adapter_names(pipe)
    np.testing.assert_array_equal(image(pipe), base)  # the base modules come back untouched
    merge_lora(pipe, a, 0.5)
    np.testing.assert_allclose(only_a, image(pipe), atol=1e-4)
    merge_lora(pipe, b, 0.7)
    np.testing.assert_allclose(together, image(pipe), atol=1e-4)
    assert np.abs(together - only_a).max() > 1e-2


def test_merge_then_unmerge_restores_base_weights(pipe):
    before = weights(pipe)
    a, b = random_adapter(pipe, seed=6), random_adapter(pipe, seed=7, rank=2, alpha=5.0)
    merge_lora(pipe, a, 0.8)
    merge_lora(pipe, b, -1.5)
    changed = [k for k, v in weights(pipe).items() if not torch.equal(before[k], v)]
    unmerge_lora(pipe, a, 0.8)
    unmerge_lora(pipe, b, -1.5)
    assert len(changed) == len(a.layers)  # every targeted weight, nothing else
    for k, v in weights(pipe).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_merge_into_peft_wrapped_model_changes_base_layer(pipe):
    a, b = random_adapter(pipe, seed=8), random_adapter(pipe, seed=9)
    apply_loras(pipe, [(a, 1.0)])
    merge_lora(pipe, b)  # lands in the base weights under diffusers' peft wrappers
    both = image(pipe)
    remove_loras(pipe)
    merge_lora(pipe, a)
    np.testing.assert_allclose(image(pipe), both, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(pipe, dtype):
    pipe.unet.to(dtype)
    pipe.text_encoder.to(dtype)
    adapter = random_adapter(pipe, seed=10)
    adapter.layers = {k: LoraLayer(v.down.to(dtype), v.up.to(dtype), v.alpha) for k, v in adapter.layers.items()}
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    weight = pipe.unet.get_submodule(name).weight
    before = weight.detach().clone()
    merge_lora(pipe, adapter, 0.7)
    assert weight.dtype == dtype
    expected = (before.float() + 0.7 * delta(adapter.layers[f"unet.{name}"])).to(dtype)
    torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=0)  # fp32 sum, rounded once
    unmerge_lora(pipe, adapter, 0.7)
    torch.testing.assert_close(weight.detach().float(), before.float(), rtol=0,
                               atol=2 * torch.finfo(dtype).eps * before.abs().max().item())


def test_failures_leave_the_model_untouched(pipe):
    before = weights(pipe)
    adapter = random_adapter(pipe, seed=11)
    adapter.layers["unet.down_blocks.7.nothing"] = LoraLayer(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)
    with pytest.raises(UserError, match="do not exist in this model.*down_blocks.7"):
        merge_lora(pipe, adapter)
    adapter = random_adapter(pipe, seed=11)
    name = next(iter(adapter.layers))
    adapter.layers[name] = LoraLayer(torch.zeros(2, 5), torch.zeros(7, 2), 2.0)
    with pytest.raises(UserError, match="has shape"):
        merge_lora(pipe, adapter)
    for k, v in weights(pipe).items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(UserError, match="adapter 2 .* does not fit"):
        apply_loras(pipe, [(random_adapter(pipe, seed=12), 1.0), (adapter, 1.0)])
    assert not loaded_adapter_names(pipe)
