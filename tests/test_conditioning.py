"""One conditioning path for SD 1.x, SD 2.x and SDXL: what the UNet is given in training, generation and previews."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainers.loop as loop
from models.conditioning import SD1, SD2, SDXL, Conditioning, condition, encode_prompts, model_family
from pipelines.generation import GenerationRequest, generate
from models.loading import load_model
from trainers.dataset import DatasetConfig, ImageFolderDataset, centre_crop
from trainers.loop import TrainConfig, snr_weights, train
from trainers.lora import LoraMethod
from training_data import draw_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def family_dir(request, tiny_model_dir, tiny_sd2_dir, tiny_sdxl_dir) -> tuple[str, Path]:
    return request.param, {"sd1": tiny_model_dir, "sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}[request.param]


def test_each_family_is_recognised(family_dir):
    key, folder = family_dir
    family = model_family(load_model(folder).pipe)
    assert family is {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}[key]


def test_generation_through_the_conditioning_path_is_the_pipelines_own_image(family_dir):
    """generate() encodes through conditioning.encode_prompts; the image equals diffusers' pipe(prompt=...)."""
    _, folder = family_dir
    model = load_model(folder)
    for guidance, negative in ((7.0, "blue"), (1.0, "")):
        request = GenerationRequest(prompt="a red circle", negative_prompt=negative, steps=3, guidance=guidance,
                                    seed=3)
        ours = np.asarray(next(generate(model, request)).image)
        with torch.inference_mode():
            theirs = model.pipe(prompt=request.prompt, negative_prompt=negative or None, num_inference_steps=3,
                                guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(3)).images[0]
        assert np.array_equal(ours, np.asarray(theirs))


def test_sd_conditioning_is_the_text_encoders_last_hidden_state(tiny_sd2_dir):
    pipe = load_model(tiny_sd2_dir).pipe
    captions = ["a red circle", ""]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0]
        cond = condition(pipe, captions)
    assert cond.pooled is None and cond.time_ids is None
    assert torch.equal(cond.hidden, expected)
    assert set(cond.unet_kwargs()) == {"encoder_hidden_states"}


def test_sdxl_conditioning_is_both_encoders_penultimate_states_pooled_and_time_ids(tiny_sdxl_dir):
    pipe = load_model(tiny_sdxl_dir).pipe
    captions = ["a red circle", "a blue square"]
    states, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        cond = condition(pipe, captions, original_sizes=[(48, 64), (32, 32)], crops=[(0, 8), (0, 0)],
                         target_sizes=[(32, 48), (32, 32)])
    assert torch.allclose(cond.hidden, torch.cat(states, dim=-1), atol=1e-6)
    assert torch.allclose(cond.pooled, pooled, atol=1e-6)
    assert cond.time_ids.tolist() == [[48, 64, 0, 8, 32, 48], [32, 32, 0, 0, 32, 32]]
    kwargs = cond.unet_kwargs(torch.float32)
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    with torch.no_grad():  # the UNet accepts exactly this
        out = pipe.unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), **kwargs).sample
    assert out.shape == (2, 4, 16, 16)


def test_the_dataset_records_each_images_original_size_and_crop(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (96, 64), "red").save(folder / "wide.png")
    Image.new("RGB", (40, 80), "red").save(folder / "tall.png")
    rotated = Image.new("RGB", (96, 64), "red")
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated by 90°: 64 wide, 96 tall
    rotated.save(folder / "rotated.jpg", exif=exif)
    square = {s.path.name: s for s in ImageFolderDataset(DatasetConfig(str(folder), resolution=32)).samples}
    assert square["wide.png"].micro_conditioning == ((64, 96), (0, 8), (32, 32))  # 48x32 after scaling: 8 cut left
    assert square["tall.png"].micro_conditioning == ((80, 40), (16, 0), (32, 32))
    assert square["rotated.jpg"].original == (64, 96)
    bucketed = {s.path.name: s for s in ImageFolderDataset(DatasetConfig(str(folder), resolution=32, buckets=True),
                                                           size_multiple=8).samples}
    wide = bucketed["wide.png"]
    assert wide.size[0] > wide.size[1] and wide.crop == centre_crop((96, 64), wide.size)


class _Recorder:
    """Wraps the loop's ``condition`` to see what every step conditioned the UNet on."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, pipe, captions, **kwargs) -> Conditioning:
        cond = condition(pipe, captions, **kwargs)
        self.calls.append({"captions": list(captions), "time_ids": None if cond.time_ids is None
                           else cond.time_ids.tolist(), "grad": torch.is_grad_enabled()})
        return cond


class _NoFile(LoraMethod):
    def save_artifact(self, path, model, config):
        Path(path).write_bytes(b"")


def _run(tmp: Path, model: Path, name: str, monkeypatch, **overrides) -> tuple[_Recorder, loop.TrainResult]:
    recorder = _Recorder()
    monkeypatch.setattr(loop, "condition", recorder)
    data = tmp / "data"
    if not data.exists():
        draw_dataset(data, n=4, size=(48, 32), caption="a red circle")
    settings = dict(data=str(data), out=str(tmp / f"{name}.safetensors"), model=str(model), steps=4, batch_size=2,
                    lr=1e-3, seed=1, method_options={"rank": 2})
    result = train(TrainConfig(**{**settings, **overrides}), _NoFile(), tmp / name)
    return recorder, result


def test_sdxl_training_gives_the_unet_each_images_time_ids(tiny_sdxl_dir, tmp_path, monkeypatch):
    recorder, result = _run(tmp_path, tiny_sdxl_dir, "xl", monkeypatch, buckets=True, resolution=32)
    assert result.status == "done" and all(np.isfinite(result.losses))
    dataset = ImageFolderDataset(DatasetConfig(str(tmp_path / "data"), resolution=32, buckets=True), size_multiple=4)
    expected = [list(o) + list(c) + list(t) for o, c, t in (s.micro_conditioning for s in dataset.samples)]
    assert expected[0][:2] == [32, 48]  # the drawn images are 48 wide, 32 high
    for call in recorder.calls:
        assert all(row in expected for row in call["time_ids"])
        assert not call["grad"]  # nothing in the text encoders trains


def test_caption_dropout_replaces_that_share_of_captions_with_an_empty_one(tiny_sdxl_dir, tmp_path, monkeypatch):
    off, _ = _run(tmp_path, tiny_sdxl_dir, "off", monkeypatch, steps=10)
    assert all(c for call in off.calls for c in call["captions"])
    on, _ = _run(tmp_path, tiny_sdxl_dir, "on", monkeypatch, steps=10, caption_dropout=0.5)
    captions = [c for call in on.calls for c in call["captions"]]
    assert 4 <= captions.count("") <= 16, captions  # 20 captions at p = 0.5
    again, _ = _run(tmp_path, tiny_sdxl_dir, "again", monkeypatch, steps=10, caption_dropout=0.5)
    assert [c for call in again.calls for c in call["captions"]] == captions  # seeded: a resume draws the same


def test_every_loss_option_runs_alike_on_each_family(family_dir, tmp_path, monkeypatch):
    """Prior preservation, caption dropout, min-SNR, noise offset (and SD 2.x's v-prediction on a zero-terminal-SNR
    schedule) on every family: finite losses, every step conditioned."""
    key, folder = family_dir
    prior = draw_dataset(tmp_path / "prior", n=2, caption="a red square", shape="square")
    recorder, result = _run(tmp_path, folder, key, monkeypatch, prior_data=str(prior), prior_weight=0.5,
                            caption_dropout=0.25, min_snr_gamma=5.0, noise_offset=0.05)
    assert result.status == "done" and len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert len(recorder.calls) == 8  # data + prior per step
    assert (recorder.calls[0]["time_ids"] is not None) == (key == "sdxl")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_finite_on_a_zero_terminal_snr_schedule(prediction):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6
    weights = snr_weights(scheduler.alphas_cumprod, torch.tensor([0, 500, 999]), 5.0, prediction)
    assert torch.isfinite(weights).all()
    # the formula's limits at SNR 0: min(snr, γ)/snr → 1 for ε; min(snr, γ)/(snr + 1) = 0 for v
    assert float(weights[2]) == (1.0 if prediction == "epsilon" else 0.0)


def test_encode_prompts_pairs_prompt_and_negative_for_cfg(tiny_sdxl_dir):
    pipe = load_model(tiny_sdxl_dir).pipe
    with torch.no_grad():
        embeds = encode_prompts(pipe, "a red circle", "blue", cfg=True)
    kwargs = embeds.pipeline_kwargs()
    assert set(kwargs) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                           "negative_pooled_prompt_embeds"}
    assert not torch.equal(kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"])
