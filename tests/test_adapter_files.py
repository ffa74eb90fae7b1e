"""Adapter files: exact key layouts of both formats, kohya/peft/old-diffusers imports, round trips, metadata, refusals.

These tests only read the session ``tiny_model`` (names and shapes); what adapters do to images is in
``test_lora_apply.py``.
"""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core import safetensors_files
from adapters.lora.files import (LoraAdapter, LoraLayer, check_base, delta, detect_format, export_lora,
                                     load_lora, lora_metadata, save_lora)
from core.errors import UserError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TE_Q = "encoder.layers.0.self_attn.q_proj"  # transformers 5 module path; files say text_model.encoder...


def random_adapter(pipe, seed: int, rank: int = 4, alpha: float = 2.0, text_encoder: bool = True) -> LoraAdapter:
    """Rank-4, alpha-2 LoRA on the UNet's attention (and the text encoder's projections); ``up`` is not zero.

    Also used by ``test_library.py``.
    """
    g = torch.Generator().manual_seed(seed)
    layers = {}
    components = [("unet", UNET_TARGETS)] + ([("text_encoder", TE_TARGETS)] if text_encoder else [])
    for component, targets in components:
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                out_f, in_f = module.weight.shape
                layers[f"{component}.{name}"] = LoraLayer(down=torch.randn(rank, in_f, generator=g) * 0.3,
                                                          up=torch.randn(out_f, rank, generator=g) * 0.3, alpha=alpha)
    meta = lora_metadata("lora", "f" * 16, ["sks"], rank, alpha, {"steps": 1, "lr": 1e-4}, "tiny", "test-lora")
    return LoraAdapter(layers=layers, metadata=meta)


def assert_same_deltas(a: LoraAdapter, b: LoraAdapter) -> None:
    assert a.layers.keys() == b.layers.keys()
    for name, layer in a.layers.items():
        torch.testing.assert_close(delta(b.layers[name]), delta(layer), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return tiny_model.pipe  # read-only here: names and shapes


def test_layer_delta_rank_and_conv_shapes():
    g = torch.Generator().manual_seed(0)
    linear = LoraLayer(down=torch.randn(4, 6, generator=g), up=torch.randn(5, 4, generator=g), alpha=2.0)
    assert linear.rank == 4 and linear.weight_shape == (5, 6)
    torch.testing.assert_close(delta(linear), linear.up @ linear.down * 0.5)
    conv = LoraLayer(down=torch.randn(3, 2, 3, 3, generator=g), up=torch.randn(7, 3, 1, 1, generator=g), alpha=3.0)
    expected = torch.einsum("or,rikl->oikl", conv.up[:, :, 0, 0], conv.down)
    torch.testing.assert_close(delta(conv), expected)
    half = LoraLayer(down=linear.down.half(), up=linear.up.half(), alpha=2.0)
    assert delta(half).dtype == torch.float32


def test_diffusers_layout_folds_alpha_into_up(pipe, tmp_path):
    adapter = random_adapter(pipe, seed=1)
    path = save_lora(adapter, tmp_path / "a.safetensors", format="diffusers")
    with safe_open(str(path), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
        up = fh.get_tensor(f"unet.{Q}.lora_B.weight")
    expected = {f"{name}.lora_{ab}.weight" for name in adapter.layers for ab in "AB"}
    assert keys == expected
    assert f"text_encoder.text_model.{TE_Q}.lora_A.weight" in keys  # conventional, transformers-4-style path
    torch.testing.assert_close(up, adapter.layers[f"unet.{Q}"].up * 0.5)  # alpha/rank = 2/4 baked in
    assert meta["atelier.format"] == "diffusers" and meta["atelier.lora_alpha"] == "2.0"
    again = load_lora(path, pipe)
    assert again.layers[f"unet.{Q}"].alpha == 2.0  # the real alpha comes back, for kohya exports
    torch.testing.assert_close(again.layers[f"unet.{Q}"].up, adapter.layers[f"unet.{Q}"].up)
    assert_same_deltas(adapter, again)
    assert again.metadata["atelier.format"] == "diffusers"


def test_kohya_layout_has_real_alpha(pipe, tmp_path):
    adapter = random_adapter(pipe, seed=2)
    path = save_lora(adapter, tmp_path / "a.safetensors", format="kohya")
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        alpha, up = fh.get_tensor(f"{stem}.alpha"), fh.get_tensor(f"{stem}.lora_up.weight")
    assert f"{stem}.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert len(keys) == 3 * len(adapter.layers)
    assert alpha.dim() == 0 and alpha.item() == 2.0
    torch.testing.assert_close(up, adapter.layers[f"unet.{Q}"].up)  # not scaled: kohya applies alpha itself
    assert_same_deltas(adapter, load_lora(path, pipe))


def kohya_file_as_kohya_writes_it(pipe, path) -> dict[str, torch.Tensor]:
    """What sd-scripts' networks.lora saves for SD 1.x (fp16, LoCon conv layers, per-module alpha), written by hand."""
    g = torch.Generator().manual_seed(5)
    modules = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": pipe.unet.get_submodule(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj": pipe.unet.get_submodule(
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"),
        "lora_unet_mid_block_attentions_0_proj_in": pipe.unet.get_submodule("mid_block.attentions.0.proj_in"),
        "lora_unet_down_blocks_1_resnets_0_conv1": pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1"),
        "lora_unet_up_blocks_0_resnets_1_conv_shortcut": pipe.unet.get_submodule("up_blocks.0.resnets.1.conv_shortcut"),
        "lora_te_text_model_encoder_layers_1_mlp_fc1": pipe.text_encoder.get_submodule("encoder.layers.1.mlp.fc1"),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": pipe.text_encoder.get_submodule(
            "encoder.layers.1.self_attn.v_proj"),
    }
    tensors = {}
    for i, (stem, module) in enumerate(modules.items()):
        rank = 8 if i % 2 else 4
        w = module.weight
        if w.dim() == 4:  # conv: down is a conv of the layer's kernel, up a 1×1 conv
            down, up = torch.randn(rank, *w.shape[1:], generator=g), torch.randn(w.shape[0], rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        tensors[f"{stem}.lora_down.weight"] = down.half()
        tensors[f"{stem}.lora_up.weight"] = up.half()
        tensors[f"{stem}.alpha"] = torch.tensor(float(1 + i)).half()
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "8",
                                            "ss_network_alpha": "1.0", "ss_output_name": "handmade"})
    return tensors


def test_kohya_file_as_kohya_writes_it_imports_to_same_delta(pipe, tmp_path):
    path = tmp_path / "kohya.safetensors"
    tensors = kohya_file_as_kohya_writes_it(pipe, path)
    assert detect_format(tensors) == "kohya"
    adapter = load_lora(path, pipe)
    names = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj":
            "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_mid_block_attentions_0_proj_in": "unet.mid_block.attentions.0.proj_in",
        "lora_unet_down_blocks_1_resnets_0_conv1": "unet.down_blocks.1.resnets.0.conv1",
        "lora_unet_up_blocks_0_resnets_1_conv_shortcut": "unet.up_blocks.0.resnets.1.conv_shortcut",
        "lora_te_text_model_encoder_layers_1_mlp_fc1": "text_encoder.text_model.encoder.layers.1.mlp.fc1",
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj":
            "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
    }
    assert set(adapter.layers) == set(names.values())
    for stem, name in names.items():
        down, up = tensors[f"{stem}.lora_down.weight"].float(), tensors[f"{stem}.lora_up.weight"].float()
        alpha, rank = tensors[f"{stem}.alpha"].item(), down.shape[0]
        expected = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * alpha / rank
        torch.testing.assert_close(delta(adapter.layers[name]), expected)
    assert adapter.metadata["ss_output_name"] == "handmade" and adapter.metadata["atelier.format"] == "kohya"
    # Without a model, diffusers' own renaming rules resolve SD 1.x names to the same layers.
    assert_same_deltas(adapter, load_lora(path))


def test_kohya_without_alpha_means_alpha_equals_rank(pipe, tmp_path):
    stem = "lora_unet_" + Q.replace(".", "_")
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, str(tmp_path / "k.safetensors"))
    adapter = load_lora(tmp_path / "k.safetensors", pipe)
    torch.testing.assert_close(delta(adapter.layers[f"unet.{Q}"]), up @ down)


def test_linear_lora_on_a_1x1_conv_takes_the_models_layout(pipe, tmp_path):
    """SD 2.x-style (Linear) ``proj_in`` LoRA on SD 1.x's 1×1-conv ``proj_in``: same ΔW, the conv's shapes."""
    name = "unet.mid_block.attentions.0.proj_in"
    down, up = torch.randn(4, 64), torch.randn(64, 4)
    save_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, str(tmp_path / "lin.safetensors"))
    layer = load_lora(tmp_path / "lin.safetensors", pipe).layers[name]
    assert layer.down.shape == (4, 64, 1, 1) and layer.up.shape == (64, 4, 1, 1)
    torch.testing.assert_close(delta(layer), (up @ down)[:, :, None, None])


def test_round_trips_preserve_delta(pipe, tmp_path):
    adapter = random_adapter(pipe, seed=3)
    d = save_lora(adapter, tmp_path / "a.safetensors", format="diffusers")
    k = export_lora(d, tmp_path / "a.kohya.safetensors", "kohya", pipe)
    back = export_lora(k, tmp_path / "b.safetensors", "diffusers", pipe)
    assert_same_deltas(adapter, load_lora(k, pipe))
    assert_same_deltas(adapter, load_lora(back, pipe))
    assert_same_deltas(adapter, load_lora(export_lora(k, tmp_path / "c.safetensors", "diffusers"), pipe))
    with safe_open(str(k), "pt") as fh:
        alphas = {fh.get_tensor(key).item() for key in fh.keys() if key.endswith(".alpha")}
        assert alphas == {2.0} and fh.metadata()["modelspec.title"] == "test-lora"  # metadata travels along


def test_kohya_export_gives_every_module_one_alpha(pipe, tmp_path):
    adapter = random_adapter(pipe, seed=4)
    for i, layer in enumerate(adapter.layers.values()):
        layer.alpha = 2.0 if i % 3 else 7.0
    path = save_lora(adapter, tmp_path / "mixed.safetensors", format="kohya")
    with safe_open(str(path), "pt") as fh:
        assert {fh.get_tensor(key).item() for key in fh.keys() if key.endswith(".alpha")} == {2.0}
    assert_same_deltas(adapter, load_lora(path, pipe))


def test_old_diffusers_layouts_import(pipe, tmp_path):
    g = torch.Generator().manual_seed(6)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    files = {  # key stem in the file → our layer name
        f"unet.{attn}.to_q.lora": f"unet.{attn}.to_q",  # LoRACompatibleLinear era
        f"{attn}.processor.to_out_lora": f"unet.{attn}.to_out.0",  # attention-processor era, no component prefix
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora":
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
        "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_linear_layer":
            "text_encoder.text_model.encoder.layers.1.mlp.fc2",
    }
    tensors = {}
    for stem, name in files.items():
        component, _, path = name.partition(".")
        module = getattr(pipe, component).get_submodule(path.removeprefix("text_model."))
        out_f, in_f = module.weight.shape
        tensors[f"{stem}.down.weight"] = torch.randn(2, in_f, generator=g)
        tensors[f"{stem}.up.weight"] = torch.randn(out_f, 2, generator=g)
    save_file(tensors, str(tmp_path / "old.safetensors"))
    adapter = load_lora(tmp_path / "old.safetensors", pipe)
    assert adapter.metadata["atelier.format"] == "diffusers-legacy"
    assert set(adapter.layers) == set(files.values())
    for stem, name in files.items():
        torch.testing.assert_close(delta(adapter.layers[name]),
                                   tensors[f"{stem}.up.weight"] @ tensors[f"{stem}.down.weight"])


def test_diffusers_adapter_config_alpha_is_honoured(tmp_path):
    """A file from diffusers' own ``save_lora_weights`` with its peft config (alpha_pattern, rsLoRA) in metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from models.tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        alpha_pattern={"to_k": 6}, use_rslora=True, init_lora_weights=False)
    pipe.unet.add_adapter(config)
    truth = {f"unet.{name}": module.get_delta_weight("default") for name, module in pipe.unet.named_modules()
             if isinstance(module, PeftLoraLayer)}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    adapter = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert adapter.layers.keys() == truth.keys()
    for name, expected in truth.items():
        torch.testing.assert_close(delta(adapter.layers[name]), expected.float(), rtol=1e-5, atol=1e-6)
    # Re-saved, the old config must not travel along: diffusers would apply its alpha to our folded lora_B again.
    resaved = save_lora(adapter, tmp_path / "resaved.safetensors", format="diffusers")
    with safe_open(str(resaved), "pt") as fh:
        assert "lora_adapter_metadata" not in fh.metadata()
    assert_same_deltas(adapter, load_lora(resaved))


def test_metadata_is_readable_by_other_tools(pipe, tmp_path):
    adapter = random_adapter(pipe, seed=7)
    adapter.metadata = lora_metadata("lora", "f" * 16, ["sks", "red circle", ""], 4, 2.0, {"steps": 1, "lr": 1e-4},
                                     "tiny", "test-lora", resolution=32)
    for fmt in ("diffusers", "kohya"):
        path = save_lora(adapter, tmp_path / f"m-{fmt}.safetensors", format=fmt)
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["atelier.method"] == "lora" and meta["atelier.format"] == fmt
        assert meta["atelier.base_fingerprint"] == "f" * 16
        assert meta["atelier.trigger_words"] == "sks, red circle"
        assert json.loads(meta["atelier.settings"]) == {"lr": 1e-4, "steps": 1}
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
        assert meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_output_name"] == "test-lora" and meta["ss_sd_model_name"] == "tiny"
        assert json.loads(meta["ss_tag_frequency"]) == {"test-lora": {"sks": 1, "red circle": 1}}
        assert meta["modelspec.sai_model_spec"] == "1.0.0"
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.title"] == "test-lora"
        assert meta["modelspec.trigger_phrase"] == "sks, red circle" and meta["modelspec.resolution"] == "32x32"
        assert meta["modelspec.date"][:2] == "20" and "T" in meta["modelspec.date"]


def test_non_string_metadata_is_written_as_text(pipe, tmp_path):
    adapter = random_adapter(pipe, seed=8)
    adapter.metadata.update({"x.steps": 5, "x.list": ["a", 1]})
    meta = load_lora(save_lora(adapter, tmp_path / "m.safetensors"), pipe).metadata
    assert meta["x.steps"] == "5" and json.loads(meta["x.list"]) == ["a", 1]


def test_save_is_atomic(pipe, tmp_path, monkeypatch):
    path = save_lora(random_adapter(pipe, seed=9), tmp_path / "keep.safetensors")
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_files, "save_file", disk_full)
    with pytest.raises(UserError, match="could not save .*keep.safetensors: No space left on device"):
        save_lora(random_adapter(pipe, seed=10), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    with pytest.raises(UserError, match=r"\.safetensors"):
        save_lora(random_adapter(pipe, seed=9), tmp_path / "x.pt")


def test_base_model_check(tiny_model, pipe):
    adapter = random_adapter(pipe, seed=11)
    warning = check_base(adapter, tiny_model.fingerprint)
    assert "another base model" in warning and "f" * 16 in warning and tiny_model.fingerprint in warning
    with pytest.raises(UserError, match="another base model"):
        check_base(adapter, tiny_model.fingerprint, strict=True)
    adapter.metadata["atelier.base_fingerprint"] = tiny_model.fingerprint
    assert check_base(adapter, tiny_model.fingerprint, strict=True) is None
    del adapter.metadata["atelier.base_fingerprint"]
    assert check_base(adapter, tiny_model.fingerprint, strict=True) is None  # foreign files carry none


def _raises_one_line(path, match: str, pipe=None) -> None:
    with pytest.raises(UserError, match=match) as info:
        load_lora(path, pipe)
    assert "\n" not in str(info.value) and path.name in str(info.value)


def test_bad_files_are_refused_in_one_line(pipe, tmp_path):
    data = save_lora(random_adapter(pipe, seed=12), tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": (data[: len(data) // 2], "truncated"),
        "zero.safetensors": (b"", "empty"),
        "pickle.safetensors": (pickle.dumps({"a": torch.zeros(1).numpy()}), "not a valid .safetensors"),
        "tail.safetensors": (data + b"junk", "trailing bytes"),
        "header.safetensors": (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        _raises_one_line(tmp_path / name, message, pipe)
    (tmp_path / "x.ckpt").write_bytes(b"x")
    _raises_one_line(tmp_path / "x.ckpt", "only .safetensors")


def test_files_that_are_not_plain_loras_are_refused(pipe, tmp_path):
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    _raises_one_line(tmp_path / "plain.safetensors", "not a LoRA file", pipe)
    stem = "lora_unet_" + Q.replace(".", "_")
    save_file({f"{stem}.hada_w1_a": torch.zeros(2, 2), f"{stem}.hada_w1_b": torch.zeros(2, 2)},
              str(tmp_path / "loha.safetensors"))
    _raises_one_line(tmp_path / "loha.safetensors", "LyCORIS", pipe)
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 32), f"{stem}.lora_up.weight": torch.zeros(32, 2),
               f"{stem}.dora_scale": torch.zeros(1, 32)}, str(tmp_path / "dora.safetensors"))
    _raises_one_line(tmp_path / "dora.safetensors", "DoRA", pipe)


def test_unmappable_or_misfit_layers_are_named(pipe, tmp_path):
    stem = "lora_unet_" + Q.replace(".", "_")
    other = {f"lora_unet_not_a_layer_{i}.lora_{part}.weight": torch.zeros(1, 2) for i in range(5)
             for part in ("down", "up")}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match=r"5 key\(s\) cannot be mapped.*lora_unet_not_a_layer_0.*and 2 more"):
        load_lora(tmp_path / "other.safetensors", pipe)
    save_file({f"unet.{Q}.lora_A.weight": torch.zeros(2, 32), f"unet.{Q}.lora_B.weight": torch.zeros(32, 2),
               "unet.down_blocks.9.nothing.lora_A.weight": torch.zeros(2, 8),
               "unet.down_blocks.9.nothing.lora_B.weight": torch.zeros(8, 2)}, str(tmp_path / "peft.safetensors"))
    _raises_one_line(tmp_path / "peft.safetensors", r"1 layer\(s\) do not exist in this model.*down_blocks\.9", pipe)
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 320), f"{stem}.lora_up.weight": torch.zeros(320, 2)},
              str(tmp_path / "sd15.safetensors"))  # SD 1.5's 320 channels on the 32-channel tiny model
    _raises_one_line(tmp_path / "sd15.safetensors", "other shapes than this model", pipe)
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 32)}, str(tmp_path / "half.safetensors"))
    _raises_one_line(tmp_path / "half.safetensors", "incomplete", pipe)
