"""Watermark LoRA mechanics: the loss-weight scheduler as specified, the image loss, the decoder targets, files,
merging, verification refusals."""
from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from trainers.watermark_lora import LossWeightScheduler, psnr, ssim


def test_scheduler_raises_the_watermark_weight_while_bits_lag():
    s = LossWeightScheduler(gamma=0.25)
    s.update(bit_accuracy=0.6, psnr=40)
    assert (s.lambda_wm, s.lambda_img) == (0.5, 1.0)
    s.update(bit_accuracy=0.95, psnr=25)  # bits fine, PSNR low: image weight rises
    assert (s.lambda_wm, s.lambda_img) == (0.5, 1.25)
    s.update(bit_accuracy=0.95, psnr=35)  # both fine: nothing changes
    assert (s.lambda_wm, s.lambda_img) == (0.5, 1.25)


def test_below_the_psnr_floor_image_quality_comes_first_whatever_the_bits():
    """The floor the defaults use (without it λ_w grew without bound and random keys ended at 13–17 dB)."""
    s = LossWeightScheduler(gamma=0.25, psnr_floor=31.0)
    s.update(bit_accuracy=0.6, psnr=40)  # above the floor: the paper's rule, λ_w rises
    s.update(bit_accuracy=0.6, psnr=40)
    assert (s.lambda_wm, s.lambda_img) == (1.0, 1.0)
    s.update(bit_accuracy=0.6, psnr=29)  # bits lag but the images fall below the floor: λ_i up, λ_w back
    assert (s.lambda_wm, s.lambda_img) == (0.5, 1.25)
    for _ in range(5):
        s.update(bit_accuracy=0.6, psnr=29)
    assert s.lambda_wm == 0.0 and s.lambda_img == 2.5  # λ_w never negative
    plain = LossWeightScheduler(gamma=0.25)  # no floor: the paper's rule alone
    plain.update(bit_accuracy=0.6, psnr=29)
    assert (plain.lambda_wm, plain.lambda_img) == (0.5, 1.0)


def test_scheduler_raises_a_target_met_five_times_in_a_row_and_caps_it():
    s = LossWeightScheduler(bit_target=0.9, psnr_target=30, patience=5)
    for _ in range(4):
        s.update(0.95, 31)
    assert (s.bit_target, s.psnr_target) == (0.9, 30)
    s.update(0.95, 31)
    assert s.bit_target == pytest.approx(0.98) and s.psnr_target == 32.5
    s.update(0.95, 40)  # below the new bit target: the counter restarts, λ_w rises
    assert s.bit_hits == 0 and s.lambda_wm == 0.5
    for _ in range(20):
        s.update(1.0, 60)
    assert s.bit_target == pytest.approx(0.99)  # capped below 1


def test_scheduler_counters_reset_when_a_target_is_missed():
    s = LossWeightScheduler(patience=5)
    for acc in (0.95, 0.95, 0.95, 0.5, 0.95, 0.95, 0.95, 0.95):
        s.update(acc, 40)
    assert s.bit_target == 0.9 and s.bit_hits == 4


def test_image_loss_pieces():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert ssim(a, noisy).item() < ssim(a, (a + 0.02 * torch.randn_like(a)).clamp(0, 1)).item() < 1
    assert psnr(a, noisy).item() == pytest.approx(10 * torch.log10(1 / ((a - noisy) ** 2).mean()).item(), rel=1e-5)


def test_decoder_targets_are_the_up_block_convs():
    from diffusers import AutoencoderKL

    from conftest import MICRO_MODEL
    from trainers.watermark_lora import decoder_target_names

    names = decoder_target_names(AutoencoderKL.from_pretrained(MICRO_MODEL, subfolder="vae"))
    assert names and all(n.startswith("decoder.up_blocks.") for n in names)
    assert any(n.endswith("conv1") for n in names) and any("upsamplers" in n for n in names)


@pytest.fixture(scope="module")
def tiny_extractor(tmp_path_factory):
    from pipelines.watermark.extractor import BitExtractor, ExtractorConfig, save_extractor

    torch.manual_seed(0)
    return save_extractor(BitExtractor(ExtractorConfig(bits=16, filters=8, kernel=3)).eval(),
                          tmp_path_factory.mktemp("wm") / "extractor.safetensors")


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_training_writes_a_decoder_lora_with_key_and_schedule_and_merges_back_exactly(tmp_path, tiny_extractor):
    from conftest import MICRO_MODEL
    from models.loading import load_model
    from core.safetensors_files import read_metadata
    from pipelines.watermark.extractor import extractor_hash, load_extractor
    from pipelines.watermark.merge import load_watermark, watermark_applied
    from trainers.events import read_events
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    model = load_model(MICRO_MODEL)
    before = {k: v.clone() for k, v in model.pipe.vae.state_dict().items()}
    config = WatermarkConfig(out=str(tmp_path / "wm.safetensors"), key="beef", extractor=str(tiny_extractor),
                             latents=4, sample_steps=4, max_steps=6, batch_size=2)
    run = train_watermark(config, tmp_path / "run", model=model)
    assert run.result.status == "done" and run.result.step == 6 and run.key == "beef"
    # The VAE is back to its plain modules with the base weights untouched.
    after = model.pipe.vae.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    meta = read_metadata(tmp_path / "wm.safetensors")
    assert meta["atelier.method"] == "watermark" and meta["atelier.watermark_key"] == "beef"
    assert meta["atelier.watermark_extractor"] == extractor_hash(load_extractor(tiny_extractor))
    adapter = load_watermark(tmp_path / "wm.safetensors")
    assert adapter.layers and all(n.startswith("vae.decoder.up_blocks.") for n in adapter.layers)
    steps = [e for e in read_events(tmp_path / "run") if e["event"] == "step"]
    assert len(steps) == 6 and all({"lambda_img", "lambda_wm", "bit_target", "psnr_target"} <= set(e) for e in steps)
    assert steps[0]["lambda_wm"] == 0.5  # bits far below 0.9 at the start: λ_w += 2γ
    conv = model.pipe.vae.decoder.up_blocks[0].resnets[0].conv1
    weight = conv.weight.detach().clone()
    with watermark_applied(model.pipe, tmp_path / "wm.safetensors"):
        assert not torch.equal(conv.weight, weight)
    assert torch.equal(conv.weight, weight)

    secret = WatermarkConfig(out=str(tmp_path / "secret.safetensors"), key="beef", keep_key_secret=True,
                             extractor=str(tiny_extractor), latents=2, sample_steps=2, max_steps=1, batch_size=1)
    train_watermark(secret, tmp_path / "run2", model=model)
    assert read_metadata(tmp_path / "secret.safetensors")["atelier.watermark_key"] == ""
    with pytest.raises(UserError, match="key"):
        train_watermark(WatermarkConfig(out=str(tmp_path / "x.safetensors"), key="beef00",
                                        extractor=str(tiny_extractor), max_steps=1), tmp_path / "run3", model=model)


def test_generation_with_a_watermark_changes_the_decoder_only_for_that_request(tmp_path, tiny_extractor):
    from conftest import MICRO_MODEL
    from pipelines.generation import GenerationRequest, generate
    from models.loading import load_model
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    model = load_model(MICRO_MODEL)
    train_watermark(WatermarkConfig(out=str(tmp_path / "wm.safetensors"), key="0f0f", extractor=str(tiny_extractor),
                                    latents=2, sample_steps=2, max_steps=3, batch_size=2, lr=2e-2),
                    tmp_path / "run", model=model)
    request = GenerationRequest(prompt="a red circle in the center, gray background", steps=4, seed=3)

    def image(**extra):
        return next(generate(model, GenerationRequest(**{**request.__dict__, **extra})))

    plain, marked, again = image(), image(watermark=str(tmp_path / "wm.safetensors")), image()
    assert plain.image.tobytes() == again.image.tobytes()  # the decoder came back exactly
    assert plain.image.tobytes() != marked.image.tobytes()
    assert "Watermark: wm" in marked.parameters and "0f0f" not in marked.parameters
    with pytest.raises(UserError, match="watermark adapter"):
        image(loras=((str(tmp_path / "wm.safetensors"), 1.0),))
    with pytest.raises(UserError, match="not a watermark adapter"):
        image(watermark=str(tiny_extractor))


@pytest.mark.parametrize("mode", ["lora", "full_decoder"])
def test_a_training_that_fails_part_way_gives_the_model_its_decoder_back(tmp_path, tiny_extractor, monkeypatch, mode):
    from conftest import MICRO_MODEL
    from models.loading import load_model
    from trainers import watermark_lora
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    model = load_model(MICRO_MODEL)
    before = {k: v.clone() for k, v in model.pipe.vae.state_dict().items()}
    calls = []

    def failing_ssim(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return torch.tensor(1.0)

    monkeypatch.setattr(watermark_lora, "ssim", failing_ssim)
    with pytest.raises(RuntimeError, match="simulated"):
        train_watermark(WatermarkConfig(out=str(tmp_path / "wm.safetensors"), key="beef", mode=mode, lr=1e-2,
                                        extractor=str(tiny_extractor), latents=2, sample_steps=2, max_steps=4,
                                        batch_size=2), tmp_path / "run", model=model)
    assert len(calls) == 2  # one step was taken: the weights had changed when it failed
    vae = model.pipe.vae
    after = vae.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in name for name, _ in vae.named_modules()) and not hasattr(vae, "peft_config")
    assert not any(p.requires_grad for p in vae.parameters())
    assert not (tmp_path / "wm.safetensors").exists()


def test_cli_train_mode_reaches_the_trainer(monkeypatch, tmp_path):
    import launch
    from trainers import watermark_lora

    seen = {}

    def fake_train(config, run_dir, **options):
        seen["mode"] = config.mode
        raise SystemExit(0)

    monkeypatch.setattr(watermark_lora, "train_watermark", fake_train)
    parser = launch.build_parser()
    for argv, mode in ((["--mode", "full_decoder"], "full_decoder"), ([], "lora")):
        args = parser.parse_args(["watermark", "train", "--out", str(tmp_path / "x.safetensors"), *argv])
        with pytest.raises(SystemExit):
            args.func(args)
        assert seen.pop("mode") == mode
    with pytest.raises(SystemExit):
        parser.parse_args(["watermark", "train", "--out", "x.safetensors", "--mode", "decoder"])


def test_train_watermark_is_the_watermark_train_command(tmp_path):
    """The Train tab's jobs run ``launch.py train watermark``: the same options and the same handler."""
    import launch
    from cli.watermark_train import handle_train

    parser = launch.build_parser()
    argv = ["--out", str(tmp_path / "x.safetensors"), "--key", "beef", "--steps", "3", "--images", "pics"]
    alias, original = parser.parse_args(["train", "watermark", *argv]), parser.parse_args(["watermark", "train", *argv])
    assert alias.func is original.func is handle_train
    assert {k: v for k, v in vars(alias).items() if k not in ("command", "method", "watermark_command")} == \
        {k: v for k, v in vars(original).items() if k not in ("command", "method", "watermark_command")}


@pytest.mark.usefixtures("fresh_accelerator_state")
def test_a_stopped_watermark_run_keeps_its_adapter_and_resumes_exactly(tmp_path, tiny_extractor, monkeypatch):
    """A stop (the STOP file, as the Stop button writes it) after 3 of 6 steps saves the adapter as far as training got
    and a checkpoint; ``watermark train --resume RUN_DIR`` (its saved settings, the drawn key among them) ends with
    the adapter of an uninterrupted run, and the event log tells one stop, one resume, one done, steps 1..6 once."""
    from safetensors.torch import load_file

    import launch
    from conftest import MICRO_MODEL
    from models.loading import load_model
    from core.safetensors_files import read_metadata
    from trainers import watermark_lora
    from trainers.jobs import job_info
    from trainers.loop import STOP_FILE
    from trainers.watermark_lora import WatermarkConfig, train_watermark
    from training_data import assert_one_stop_and_resume, stopping_after

    model = load_model(MICRO_MODEL)

    def config(out: str, key: str | None = None) -> WatermarkConfig:
        return WatermarkConfig(out=str(tmp_path / out), key=key, model=str(MICRO_MODEL), extractor=str(tiny_extractor),
                               latents=4, sample_steps=2, max_steps=6, batch_size=2, noise_probability=0.5,
                               checkpoint_every=2, seed=5)

    run_dir, psnr = tmp_path / "b", watermark_lora.psnr
    monkeypatch.setattr(watermark_lora, "psnr", stopping_after(3, run_dir, psnr))  # psnr: once a step
    stopped = train_watermark(config("b.safetensors"), run_dir, model=model)  # no key: the drawn one must be kept
    monkeypatch.setattr(watermark_lora, "psnr", psnr)
    straight = train_watermark(config("a.safetensors", key=stopped.key), tmp_path / "a", model=model)
    assert straight.result.status == "done" and straight.result.step == 6
    assert stopped.result.status == "stopped" and stopped.result.step == 3
    assert read_metadata(tmp_path / "b.safetensors")["atelier.watermark_steps"] == "3"  # the adapter as far as it got
    assert not (run_dir / STOP_FILE).exists()
    info = job_info(run_dir)
    assert info.status == "stopped" and info.artifact == str(tmp_path / "b.safetensors")

    assert launch.main(["watermark", "train", "--resume", str(run_dir)]) == 0
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert read_metadata(tmp_path / "b.safetensors")["atelier.watermark_key"] == straight.key
    assert_one_stop_and_resume(run_dir, 6)
    assert job_info(run_dir).status == "done"
