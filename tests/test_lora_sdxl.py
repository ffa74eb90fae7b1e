"""LoRA with the text encoders, on SDXL (both encoders) and SD 1.x/2.x: training moves every part and lowers the loss,
``--resume`` is exact, and the file in either format means to diffusers' own ``load_lora_weights`` what it means to
the studio's merge. kohya files name SDXL's UNet as sd-scripts does (the original, sgm block numbering).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters.lora.files import (LoraAdapter, delta, export_lora, kohya_stem, load_lora, save_lora,
                                     sgm_unet_names)
from adapters.lora.apply import merge_lora
from test_training_loop import StateOnly, StopAt
from training_data import draw_dataset, fixed_noise_loss
from trainers.checkpoints import latest_checkpoint, load_checkpoint
from trainers.loop import TrainConfig, train

CAPTION = "sks a red circle"
LR, TE_LR = 1e-2, 2e-3  # high, for a visible effect of a short run on the tiny random models
TEXT = ("text_encoder", "text_encoder_2")


def _reset_accelerate() -> None:
    """What the ``fresh_accelerator_state`` fixture does, for the module-scoped runs below."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def _train_cli(model: Path, work: Path, steps: int, *extra: str) -> Path:
    """``launch.py train lora --train-text-encoder ...`` in-process; returns the written adapter."""
    import launch

    _reset_accelerate()
    data = draw_dataset(work / "data", n=4, caption=CAPTION)
    out = work / "trained.safetensors"
    code = launch.main(["train", "lora", "--model", str(model), "--data", str(data), "--out", str(out),
                        "--run-dir", str(work / "run"), "--steps", str(steps), "--rank", "4", "--lr", str(LR),
                        "--checkpoint-every", "1000", "--train-text-encoder", *extra])
    assert code == 0 and out.is_file()
    return out


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir, tmp_path_factory) -> Path:
    return _train_cli(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-lora"), 40, "--batch-size", "2",
                      "--text-encoder-lr", str(TE_LR), "--format", "kohya")


def _pipe(model_dir: Path):
    """A fresh pipeline of diffusers' own class for the folder (as a diffusers user loads it)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(CAPTION, num_inference_steps=3, generator=g, output_type="np").images[0]


def _only(adapter: LoraAdapter, components: tuple[str, ...]) -> LoraAdapter:
    return LoraAdapter({k: v for k, v in adapter.layers.items() if k.partition(".")[0] in components})


def _unused(model_dir: Path) -> str:
    """Encoder 1's last layer, as named in checkpoints and files: SDXL reads encoder 1's penultimate hidden states,
    so a LoRA there gets no gradient (in every SDXL trainer) and keeps its zero ``up``."""
    import json

    last = json.loads((model_dir / "text_encoder" / "config.json").read_text())["num_hidden_layers"] - 1
    return f"encoder.layers.{last}."


def _moved(state: dict[str, torch.Tensor], model_dir: Path) -> tuple[dict[str, bool], dict[str, bool]]:
    """Which ``lora_B`` (zero at the start) changed, against which should have: all but encoder 1's last layer."""
    ups = {k: v for k, v in state.items() if ".lora_B." in k}
    return {k: bool(v.abs().sum() > 0) for k, v in ups.items()}, \
        {k: not (k.startswith("text_encoder.") and _unused(model_dir) in k) for k in ups}


def _stems(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as fh:
        return {k.split(".")[0] for k in fh.keys()}


def test_sdxl_lora_trains_the_unet_and_both_text_encoders(sdxl_run, tiny_sdxl_dir):
    from models.conditioning import encode_prompts

    pipe = _pipe(tiny_sdxl_dir)
    adapter = load_lora(sdxl_run, pipe)
    assert adapter.components == {"unet", *TEXT}
    for component in ("unet", *TEXT):
        layers = _only(adapter, (component,)).layers
        moved = {name: bool(layer.up.abs().max() > 0) for name, layer in layers.items()}  # B starts at zero
        assert layers and moved == {name: not (name.startswith("text_encoder.") and _unused(tiny_sdxl_dir) in name)
                                    for name in layers}, component
        assert {name.rsplit(".", 1)[-1] for name in layers} == (
            {"to_q", "to_k", "to_v", "0"} if component == "unet" else {"q_proj", "k_proj", "v_proj", "out_proj"})
    # each part trained at its own learning rate (constant schedule: the rates are still the given ones)
    _, _, optimizer = load_checkpoint(latest_checkpoint(sdxl_run.parent / "run" / "checkpoints"))
    assert [group["lr"] for group in optimizer["param_groups"]] == [LR, TE_LR]

    with safe_open(str(sdxl_run), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.resolution"] == "32x32"
    assert meta["atelier.format"] == "kohya"

    data = sdxl_run.parent / "data"
    before_loss, before_image = fixed_noise_loss(pipe, data, CAPTION), _image(pipe)
    embeds = encode_prompts(pipe, CAPTION)
    merge_lora(pipe, _only(adapter, TEXT))  # the text encoders' part alone changes both encoders' embeddings
    changed = encode_prompts(pipe, CAPTION)
    width = pipe.text_encoder.config.hidden_size  # SDXL concatenates encoder 1's and encoder 2's hidden states
    assert (changed.positive[..., :width] - embeds.positive[..., :width]).abs().max() > 1e-3
    assert (changed.positive[..., width:] - embeds.positive[..., width:]).abs().max() > 1e-3
    assert (changed.pooled - embeds.pooled).abs().max() > 1e-3
    merge_lora(pipe, _only(adapter, ("unet",)))
    after_loss, after_image = fixed_noise_loss(pipe, data, CAPTION), _image(pipe)
    print(f"SDXL denoising loss before {before_loss:.4f} after {after_loss:.4f}; "
          f"image change {np.abs(after_image - before_image).max():.3f}")
    assert after_loss < 0.95 * before_loss, (before_loss, after_loss)  # here 1.075 → 0.955 (×0.89)
    assert np.abs(after_image - before_image).max() > 0.05


def test_sdxl_lora_in_both_formats_is_read_by_diffusers_as_our_merge(sdxl_run, tiny_sdxl_dir, tmp_path):
    """diffusers' ``StableDiffusionXLPipeline.load_lora_weights`` on each file gives the image our merge gives."""
    from diffusers import StableDiffusionXLPipeline

    pipe = _pipe(tiny_sdxl_dir)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    adapter = load_lora(sdxl_run, pipe)
    files = {fmt: save_lora(adapter, tmp_path / f"{fmt}.safetensors", format=fmt, pipe=pipe)
             for fmt in ("diffusers", "kohya")}
    assert {s.partition(".")[0] for s in _stems(files["diffusers"])} == {"unet", *TEXT}
    kohya = _stems(files["kohya"])
    assert {s.split("_", 2)[1] for s in kohya} == {"unet", "te1", "te2"}
    unet_blocks = {s.removeprefix("lora_unet_").split("_")[0] for s in kohya if s.startswith("lora_unet_")}
    assert unet_blocks == {"input", "middle", "output"}  # sd-scripts' SDXL UNet numbering, not down_blocks_
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in kohya  # down_blocks.1.attentions.0
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in kohya

    base = _image(pipe)
    merge_lora(pipe, adapter)
    ours = _image(pipe)
    theirs = {}
    for fmt, path in files.items():
        fresh = _pipe(tiny_sdxl_dir)
        fresh.load_lora_weights(str(path))
        assert set(fresh.get_list_adapters()) == {"unet", *TEXT}, fmt
        theirs[fmt] = _image(fresh)
        np.testing.assert_allclose(theirs[fmt], ours, atol=2e-5, err_msg=fmt)
        again = load_lora(path, pipe)  # and the studio reads its file back to the same ΔW
        assert again.layers.keys() == adapter.layers.keys()
        for name, layer in adapter.layers.items():
            torch.testing.assert_close(delta(again.layers[name]), delta(layer), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theirs["kohya"], theirs["diffusers"], atol=2e-5)
    assert np.abs(ours - base).max() > 0.05


def test_sdxl_kohya_names_are_sd_scripts_names():
    """Every Linear/Conv of the real SDXL base UNet (built on the meta device, no weights) gets sd-scripts' name,
    and diffusers' own kohya converter maps each back to the same layer."""
    from diffusers import UNet2DConditionModel

    from adapters.lora.files import _kohya_names_by_diffusers

    sgm = sgm_unet_names()  # SDXL base's layout
    known = {  # as in kohya SDXL LoRA files (attention set; LoCon layers)
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0":
            "output_blocks_0_1_transformer_blocks_0_attn2_to_out_0",
        "up_blocks.1.attentions.2.proj_out": "output_blocks_5_1_proj_out",
        "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks_8_0_skip_connection",
        "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "add_embedding.linear_1": "label_emb_0_0", "time_embedding.linear_2": "time_embed_2",
        "conv_in": "input_blocks_0_0", "conv_out": "out_2",
    }
    for name, stem in known.items():
        assert kohya_stem(f"unet.{name}", sdxl=True, sgm=sgm) == f"lora_unet_{stem}"
    assert kohya_stem("text_encoder.encoder.layers.0.mlp.fc1", sdxl=True) == "lora_te1_text_model_encoder_layers_0_mlp_fc1"

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    stems = {kohya_stem(f"unet.{n}", sdxl=True, sgm=sgm): f"unet.{n}" for n in names}
    assert len(stems) == len(names) == 794
    assert _kohya_names_by_diffusers(list(stems), unet.config) == stems


def test_sdxl_kohya_files_with_diffusers_numbering_still_read(tiny_sdxl_dir, tmp_path):
    """Our SDXL kohya files before the sgm numbering (lora_unet_down_blocks_…) keep loading."""
    pipe = _pipe(tiny_sdxl_dir)
    g = torch.Generator().manual_seed(0)
    tensors, truth = {}, {}
    for name in ("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", "up_blocks.0.resnets.1.conv2"):
        w = pipe.unet.get_submodule(name).weight
        down = torch.randn(2, *w.shape[1:], generator=g)
        up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g)
        stem = kohya_stem(f"unet.{name}", sdxl=True)  # no sgm map: the old names
        tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(2.0)})
        truth[f"unet.{name}"] = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(tensors, str(tmp_path / "old.safetensors"))
    adapter = load_lora(tmp_path / "old.safetensors", pipe)
    assert adapter.layers.keys() == truth.keys()
    for name, expected in truth.items():
        torch.testing.assert_close(delta(adapter.layers[name]), expected)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_sdxl_resume_with_text_encoders_is_exact(tiny_sdxl_dir, tmp_path):
    data = draw_dataset(tmp_path / "data", n=4, caption=CAPTION)

    def config(name: str) -> TrainConfig:
        return TrainConfig(data=str(data), out=str(tmp_path / f"{name}.safetensors"), model=str(tiny_sdxl_dir),
                           steps=6, batch_size=2, lr=LR, checkpoint_every=2, seed=3, min_snr_gamma=5.0,
                           method_options={"rank": 4, "train_text_encoder": True, "text_encoder_lr": TE_LR})

    straight = StateOnly()
    assert train(config("a"), straight, tmp_path / "a").step == 6
    stopped = train(config("b"), StopAt(tmp_path / "b", at=3), tmp_path / "b")
    assert stopped.status == "stopped" and stopped.step == 3
    resumed = StateOnly()
    assert train(config("b"), resumed, tmp_path / "b", resume=True).status == "done"
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    for prefix in ("text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in a), prefix
    assert any(not k.startswith(TEXT) for k in a)  # the UNet's keys, unprefixed as before
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    moved, expected = _moved(a, tiny_sdxl_dir)
    assert moved == expected


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_text_encoder_lora_trains_under_gradient_checkpointing(tiny_sdxl_dir, tmp_path):
    """Checkpointed encoder layers still pass gradients to their LoRA (the embeddings before them are frozen)."""
    data = draw_dataset(tmp_path / "data", n=2, caption=CAPTION)
    method = StateOnly()
    train(TrainConfig(data=str(data), out=str(tmp_path / "o.safetensors"), model=str(tiny_sdxl_dir), steps=2,
                      lr=LR, gradient_checkpointing=True,
                      method_options={"rank": 2, "train_text_encoder": True}), method, tmp_path / "run")
    moved, expected = _moved(method.trainable_state(), tiny_sdxl_dir)
    assert moved == expected and any(k.startswith("text_encoder_2.") for k in moved)


@pytest.mark.parametrize("model_fixture,written,meta", [
    ("tiny_model_dir", "kohya", {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora",
                                  "modelspec.prediction_type": "epsilon", "ss_v2": "False"}),
    ("tiny_sd2_dir", "diffusers", {"ss_base_model_version": "sd_v2_v", "ss_v2": "True",
                                    "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                                    "modelspec.prediction_type": "v"}),
], ids=["sd1", "sd2-v"])
def test_sd1_and_sd2_text_encoder_lora_is_read_by_diffusers_as_our_merge(request, model_fixture, written, meta,
                                                                        tmp_path):
    from diffusers import StableDiffusionPipeline

    model_dir = request.getfixturevalue(model_fixture)
    trained = _train_cli(model_dir, tmp_path, 12, "--format", written)
    with safe_open(str(trained), "pt") as fh:
        got = fh.metadata()
    assert {k: got[k] for k in meta} == meta and got["modelspec.resolution"] == "32x32"
    pipe = _pipe(model_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    adapter = load_lora(trained, pipe)
    assert adapter.components == {"unet", "text_encoder"}
    other = "diffusers" if written == "kohya" else "kohya"
    files = {written: trained, other: export_lora(trained, tmp_path / f"{other}.safetensors", other, pipe)}
    assert any(s.startswith("lora_te_text_model_encoder_layers_") for s in _stems(files["kohya"]))
    assert any(s.startswith("lora_unet_down_blocks_") for s in _stems(files["kohya"]))  # SD 1.x/2.x: diffusers names
    base = _image(pipe)
    merge_lora(pipe, adapter)
    ours = _image(pipe)
    assert np.abs(ours - base).max() > 0.02
    for fmt, path in files.items():
        fresh = _pipe(model_dir)
        fresh.load_lora_weights(str(path))
        assert set(fresh.get_list_adapters()) == {"unet", "text_encoder"}, fmt
        np.testing.assert_allclose(_image(fresh), ours, atol=2e-5, err_msg=fmt)


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_text_encoder_options_without_train_text_encoder_are_refused(tiny_model_dir, tmp_path, capsys):
    import launch

    data = draw_dataset(tmp_path / "data", n=1)
    code = launch.main(["train", "lora", "--model", str(tiny_model_dir), "--data", str(data), "--steps", "1",
                        "--out", str(tmp_path / "x.safetensors"), "--run-dir", str(tmp_path / "run"),
                        "--text-encoder-lr", "1e-4"])
    assert code == 2 and "need --train-text-encoder" in capsys.readouterr().err
