"""SaRA, Break-for-Make and the watermark LoRA on SDXL (two text encoders, pooled embeddings, time ids, its VAE's
0.13025 scaling) and on SD 2.x (v-prediction, zero terminal SNR), on the tiny random pipelines: each run short, each
effect measured.

Loss checks: on SDXL (ε-prediction) the step losses of one run fall steadily, so the mean of the last three steps is
compared with that of the first three (measured over seeds 0–4/0–5: SaRA 0.69–0.76, B4M content 0.68–0.69, style
0.74–0.78, combine 0.81–0.86). On SD 2.x the v-prediction target's size depends so much on the timestep that one
run's losses are mostly the timesteps drawn; there a run is compared with the same run at a learning rate of 1e-12
(same seed: same images, noise and timesteps), over its last four steps (measured over seeds 0–5: SaRA 0.66–0.75,
B4M content with min-SNR 0.66–0.87).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError


CONTENT_TRIGGER, STYLE_TRIGGER = "sks", "wz"
# B4M on more than the attention: on a random UNet the attention alone hardly moves the loss in a few steps.
B4M_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1,conv2,conv_out"
WATERMARK_KEY = "5c3a9e1f07b2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from a second intra-op thread, and on shared cores two threads made each step
    several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def circles(tmp_path_factory) -> Path:
    from training_data import draw_dataset

    return draw_dataset(tmp_path_factory.mktemp("data") / "circles", n=5, caption="a red circle")


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    from training_data import draw_dataset

    return draw_dataset(tmp_path_factory.mktemp("data") / "squares", n=5, caption="a red square", shape="square")


def cli(*argv: str) -> int:
    """``launch.py ARGV`` in this process (accelerate's per-process state reset first, as a fresh job has it)."""
    import launch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return launch.main([str(a) for a in argv])


def step_losses(run_dir: Path) -> list[float]:
    from trainers.events import read_events

    losses = [e["loss"] for e in read_events(run_dir) if e["event"] == "step"]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


def last_over_first(losses: list[float], k: int = 3) -> float:
    return (sum(losses[-k:]) / k) / (sum(losses[:k]) / k)


def paired_ratio(argv: list[str], run_dir: Path, k: int = 4) -> float:
    """Mean loss over the last ``k`` steps of the run ``argv`` over that of the same run at lr 1e-12 (same seed:
    same batches, noise and timesteps), so the timesteps drawn cancel out."""
    assert cli(*argv, "--run-dir", run_dir / "trained") == 0
    assert cli(*argv, "--lr", "1e-12", "--run-dir", run_dir / "untrained") == 0
    trained, untrained = step_losses(run_dir / "trained"), step_losses(run_dir / "untrained")
    assert trained[0] == pytest.approx(untrained[0])  # the same first batch, noise and timesteps
    return sum(trained[-k:]) / sum(untrained[-k:])


def start_event(run_dir: Path) -> dict:
    from trainers.events import read_events

    return next(e for e in read_events(run_dir) if e["event"] == "start")


def images_with_adapter(model, path: Path, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plain, with the adapter at strength 1, plain again) from one seed."""
    from pipelines.generation import GenerationRequest, generate

    def image(loras=()) -> np.ndarray:
        request = GenerationRequest(prompt=prompt, steps=2, seed=5, loras=loras)
        return np.asarray(next(generate(model, request)).image, dtype=np.int16)

    return image(), image(((str(path), 1.0),)), image()


# ------------------------------------------------------------------------------------------------------- SaRA


def test_sara_on_sdxl_learns_applies_in_generation_and_is_refused_on_sd1(tiny_sdxl_dir, tiny_model_dir, circles,
                                                                        tmp_path, capsys):
    from models.loading import load_model
    from adapters.sara.files import extract_lora, load_sparse_delta

    out, run = tmp_path / "sdxl-sara.safetensors", tmp_path / "run"
    assert cli("train", "sara", "--data", circles, "--model", tiny_sdxl_dir, "--out", out, "--trigger",
               CONTENT_TRIGGER, "--steps", 10, "--budget", "10%", "--lr", 5e-3, "--batch-size", 2, "--seed", 0,
               "--checkpoint-every", 1000, "--run-dir", run) == 0
    assert start_event(run)["model_family"].startswith("SDXL (2 text encoders")
    losses = step_losses(run)
    assert last_over_first(losses) < 0.85, losses

    delta = load_sparse_delta(out)
    assert delta.base_family == "sdxl" and delta.metadata["atelier.resolution"] == "32"
    # SDXL's own layers are in the trainable set: the added-conditioning MLP, the linear transformer projections
    assert any(name.startswith("unet.add_embedding.") for name in delta.tensors)
    assert any(name.endswith("proj_in.weight") and len(t.shape) == 2 for name, t in delta.tensors.items())
    extracted, _ = extract_lora(delta, 4)
    assert extracted.metadata["ss_base_model_version"].startswith("sdxl")

    model = load_model(tiny_sdxl_dir)
    before = {k: v.clone() for k, v in model.pipe.unet.state_dict().items()}
    plain, changed, again = images_with_adapter(model, out, f"{CONTENT_TRIGGER} a red circle")
    assert np.abs(changed - plain).mean() > 1.0 and np.array_equal(plain, again)
    after = model.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # taken off bit-exactly

    capsys.readouterr()
    assert cli("generate", "--prompt", "a red circle", "--model", tiny_model_dir, "--lora", out, "--steps", 1,
               "--out", tmp_path / "sd1.png") == 2
    error = capsys.readouterr().err.strip()
    assert "is a SaRA delta for SDXL; the loaded model is SD 1.x" in error and "\n" not in error
    assert not (tmp_path / "sd1.png").exists()
    print(f"SaRA on SDXL: step losses {losses[0]:.3f} … {losses[-1]:.3f}, last/first {last_over_first(losses):.3f}; "
          f"delta at strength 1 changes the image by {np.abs(changed - plain).mean():.1f} / 255 on average")


def test_sara_on_sd2_v_prediction_zero_snr_loss_falls(tiny_sd2_dir, circles, tmp_path):
    argv = ["train", "sara", "--data", circles, "--model", tiny_sd2_dir, "--out", tmp_path / "sd2.safetensors",
            "--trigger", CONTENT_TRIGGER, "--steps", 8, "--budget", "10%", "--lr", 5e-3, "--batch-size", 2, "--seed",
            0, "--checkpoint-every", 1000]
    ratio = paired_ratio(argv, tmp_path)
    assert "v_prediction" in start_event(tmp_path / "trained")["model_family"]
    print(f"SaRA on SD 2.x: last-4 loss trained/untrained {ratio:.3f}")
    assert ratio < 0.9


# ------------------------------------------------------------------------------------------------ Break-for-Make


def test_b4m_on_sdxl_stages_learn_combine_and_apply(tiny_sdxl_dir, circles, squares, tmp_path, capsys):
    from adapters.lora.files import load_lora, save_lora
    from models.loading import load_model
    from trainers.break_for_make import B4MMethod, read_plp_file
    from trainers.loop import TrainConfig

    common = ["--model", tiny_sdxl_dir, "--rank", 2, "--batch-size", 2, "--seed", 0, "--checkpoint-every", 1000,
              "--targets", B4M_TARGETS]
    content, style, combined = (tmp_path / f"{n}.safetensors" for n in ("content", "style", "combined"))

    # The micro world's scenes are for the micro model: refused in one line before anything is drawn or loaded.
    capsys.readouterr()
    assert cli("train", "b4m-content", "--data", circles, "--out", content, "--trigger", CONTENT_TRIGGER,
               "--aux-microworld", 4, "--steps", 1, "--run-dir", tmp_path / "micro", *common) == 2
    error = capsys.readouterr().err.strip()
    assert "micro-world model only" in error and "\n" not in error
    assert not (tmp_path / "micro").exists() and not content.exists()

    assert cli("train", "b4m-content", "--data", circles, "--out", content, "--trigger", CONTENT_TRIGGER, "--aux",
               squares, "--steps", 8, "--lr", 2e-2, "--run-dir", tmp_path / "rc", *common) == 0
    assert cli("train", "b4m-style", "--data", squares, "--out", style, "--trigger", STYLE_TRIGGER, "--aux", circles,
               "--steps", 8, "--lr", 5e-2, "--run-dir", tmp_path / "rs", *common) == 0
    assert cli("train", "b4m-combine", "--content", content, "--style", style, "--content-data", circles,
               "--style-data", squares, "--out", combined, "--steps", 6, "--lr", 1e-2, "--run-dir", tmp_path / "rm",
               *common) == 0
    ratios = {stage: last_over_first(step_losses(tmp_path / run)) for stage, run in
              (("content", "rc"), ("style", "rs"), ("combine", "rm"))}
    print("B4M on SDXL, last/first loss: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    assert all(r < 0.92 for r in ratios.values()), ratios

    made = read_plp_file(combined)
    assert (made.stage, made.content_trigger, made.style_trigger) == ("combine", CONTENT_TRIGGER, STYLE_TRIGGER)
    assert made.targets == tuple(B4M_TARGETS.split(","))
    assert load_lora(combined).metadata["ss_base_model_version"].startswith("sdxl")

    model = load_model(tiny_sdxl_dir)
    plain, changed, again = images_with_adapter(model, combined, f"{CONTENT_TRIGGER} {STYLE_TRIGGER} a red circle")
    assert np.abs(changed - plain).mean() > 1.0 and np.array_equal(plain, again)

    # The combine starts from the content run's down half E and the style run's up half B, also from a kohya file
    # in SDXL's original UNet numbering, resolved against the model being trained.
    pipe = model.pipe
    kohya_style = save_lora(load_lora(style), tmp_path / "style-kohya.safetensors", format="kohya", pipe=pipe)
    c, s = read_plp_file(content), read_plp_file(style)
    start = B4MMethod("combine")
    start.attach(pipe, TrainConfig(data=str(circles), out=str(tmp_path / "x.safetensors"), method="b4m-combine",
                                   method_options={"content": str(content), "style": str(kohya_style)}))
    assert set(start.layers) == set(c.layers) and any(layer.is_conv for layer in start.layers.values())
    for name, layer in start.layers.items():
        torch.testing.assert_close(layer.down_trainable.detach(), c.layers[name].e, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.up_trainable.detach(), s.layers[name].b, atol=1e-6, rtol=1e-5)
    # the command's early check of the two files reads that kohya file by the model's layout too (the tiny SDXL's
    # blocks are not SDXL base's: read by base's numbering, its frozen halves would not match)
    assert cli("train", "b4m-combine", "--content", content, "--style", kohya_style, "--content-data", circles,
               "--style-data", squares, "--out", tmp_path / "from-kohya.safetensors", "--steps", 1, "--run-dir",
               tmp_path / "rk", *common) == 0


def test_microworld_sets_are_drawn_for_the_micro_model_only(tiny_sdxl_dir, tmp_path):
    from conftest import MICRO_MODEL
    from trainers.aux_sets import microworld_aux

    with pytest.raises(UserError, match="micro-world model only"):
        microworld_aux(tmp_path / "sdxl", 2, model=tiny_sdxl_dir)
    assert not (tmp_path / "sdxl").exists()
    if not (MICRO_MODEL / "model_index.json").is_file():
        pytest.skip("the micro model is not in this checkout")
    for model in (MICRO_MODEL, None):  # None: the embedded default, the micro model when it ships
        folder = microworld_aux(tmp_path / str(model is None), 2, model=model)
        assert len(list(folder.glob("*.png"))) == 2


def test_b4m_stage_on_sd2_with_min_snr_loss_falls(tiny_sd2_dir, circles, tmp_path):
    argv = ["train", "b4m-content", "--data", circles, "--model", tiny_sd2_dir, "--out", tmp_path / "c.safetensors",
            "--trigger", CONTENT_TRIGGER, "--steps", 10, "--lr", 1e-2, "--rank", 2, "--batch-size", 2, "--seed", 0,
            "--min-snr-gamma", 5, "--targets", B4M_TARGETS, "--checkpoint-every", 1000]
    ratio = paired_ratio(argv, tmp_path)
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert config["min_snr_gamma"] == 5 and "v_prediction" in start_event(tmp_path / "trained")["model_family"]
    print(f"B4M content on SD 2.x with min-SNR 5: last-4 loss trained/untrained {ratio:.3f}")
    assert ratio < 0.95


# ------------------------------------------------------------------------------------------------------ watermark


def test_watermark_lora_on_the_sdxl_decoder_marks_generations(tiny_sdxl_dir, tmp_path, capsys):
    """As tests/test_watermark_microworld.py measures it (fresh generations with and without the watermark, read
    by the shipped extractor), in short: 40 steps instead of 200, 4 generations instead of 8. The shipped extractor
    pools over the whole image, so SDXL's tiny 32 px images read (it was trained on 64 px scenes)."""
    from models.loading import load_model
    from microworld.watermark_evaluation import fresh_generations
    from pipelines.watermark.merge import load_watermark

    model = load_model(tiny_sdxl_dir)
    vae_config = model.pipe.vae.config
    assert vae_config.scaling_factor == pytest.approx(0.13025) and vae_config.force_upcast

    out = tmp_path / "wm.safetensors"
    assert cli("train", "watermark", "--model", tiny_sdxl_dir, "--out", out, "--key", WATERMARK_KEY, "--steps", 40,
               "--lr", 2e-3, "--latents", 8, "--psnr-floor", 0, "--run-dir", tmp_path / "run") == 0  # 40 steps: bits first
    assert all(name.startswith("vae.decoder.up_blocks.") for name in load_watermark(out).layers)

    plain, marked = fresh_generations(model, out, 4)
    reports = {}
    for label, images in (("plain", plain), ("marked", marked)):
        paths = [tmp_path / f"{label}-{i}.png" for i in range(len(images))]
        for image, path in zip(images, paths):
            image.save(path)
        capsys.readouterr()
        assert cli("watermark", "verify", "--adapter", out, *paths, "--json") == 0  # key and extractor from the file
        reports[label] = json.loads(capsys.readouterr().out)
    accuracy = {label: float(np.mean([i["bit_accuracy"] for i in r["images"]])) for label, r in reports.items()}
    print(f"bit accuracy: watermarked {accuracy['marked']:.3f}, plain {accuracy['plain']:.3f}")
    assert accuracy["marked"] >= 0.65 and accuracy["marked"] - accuracy["plain"] >= 0.15, accuracy
    assert reports["marked"]["pooled"]["watermarked"] and not reports["plain"]["pooled"]["watermarked"]
