"""Single-file checkpoints: LDM export, offline from_single_file, architecture detection, refusals."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from core.errors import ModelLoadError
from models.loading import load_model
from models.single_file import (SD15_CONFIG, checkpoint_keys, config_for, detect_architecture, load_single_file,
                                   save_single_file)


@pytest.fixture(scope="module")
def single_file(tiny_model_dir, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    return save_single_file(pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors"), pipe


def test_export_uses_the_ldm_layout(single_file):
    path, _ = single_file
    keys = checkpoint_keys(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert detect_architecture(keys) == "sd1"


def test_round_trip_is_bit_identical_offline(single_file, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, pipe = single_file
    loaded = load_single_file(path, config=tiny_model_dir)
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component
    model = load_model(path, config=tiny_model_dir)
    assert model.kind == "single_file" and model.fingerprint == load_model(tiny_model_dir).fingerprint

    def image(p):
        return p("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]

    np.testing.assert_array_equal(image(pipe), image(loaded))


def test_architecture_detection():
    assert detect_architecture(["model.diffusion_model.input_blocks.0.0.weight",
                                "cond_stage_model.model.token_embedding.weight"]) == "sd2"
    assert detect_architecture(["model.diffusion_model.input_blocks.0.0.weight",
                                "conditioner.embedders.0.transformer.text_model.x",
                                "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_architecture(["conditioner.embedders.0.model.ln_final.weight"]) == "sdxl-refiner"
    assert detect_architecture(["transformer_blocks.0.attn.to_q.weight"]) == "unknown"


def test_config_choice_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert config_for("sd1", None, "x") == SD15_CONFIG
    with pytest.raises(ModelLoadError, match="needs its config folder"):
        config_for("sdxl", None, "x.safetensors")
    with pytest.raises(ModelLoadError, match="unknown architecture .* is not supported"):
        config_for("unknown", None, "x.safetensors")
    with pytest.raises(ModelLoadError, match="not a diffusers config folder"):
        config_for("sd1", tmp_path, "x.safetensors")


def test_shipped_sd15_config_is_sd15():
    """The shipped configs build SD 1.5's exact components (on the meta device: no memory) and its tokenizer."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder"))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer")
    assert tokenizer("a photo of sks teddybear in w@z style").input_ids == [
        49406, 320, 1125, 539, 48136, 25758, 4298, 530, 342, 287, 345, 1844, 49407]


def test_bad_single_files(single_file, tmp_path):
    path, _ = single_file
    data = path.read_bytes()
    cases = {"truncated.safetensors": (data[: len(data) // 3], "truncated"),
             "zero.safetensors": (b"", "empty"),
             "pickle.safetensors": (pickle.dumps({"state_dict": {}}), "not a valid .safetensors"),
             "text.safetensors": (b"hello world, not weights", "not a valid .safetensors")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelLoadError, match=message):
            load_model(tmp_path / name)
    from safetensors.torch import save_file

    save_file({"transformer_blocks.0.weight": torch.zeros(2)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ModelLoadError, match="unknown architecture .* is not supported"):
        load_model(tmp_path / "flux.safetensors")
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({}))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(tmp_path / "model.ckpt")


@pytest.mark.slow
def test_full_size_sd15_single_file_loads_offline_with_the_shipped_configs(tmp_path, monkeypatch):
    """A real-size SD 1.5 checkpoint (random fp16 weights, 2.1 GB) loads with no network through assets/sd15_config."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG / "unet")).half(),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG / "vae")).half(),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG / "text_encoder")).half(),
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG / "tokenizer"),
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = save_single_file(pipe, tmp_path / "sd15.safetensors")
    model = load_model(path)
    assert model.kind == "single_file" and list(model.pipe.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    source = pipe.unet.state_dict()
    assert all(torch.equal(source[k].float(), v.float()) for k, v in model.pipe.unet.state_dict().items())
    from models.fingerprint import pipeline_fingerprint

    assert model.fingerprint == pipeline_fingerprint(pipe)
