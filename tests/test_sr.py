"""SPAN, ConvLoRA and DSCLoRA: exact folds and merges, the reference figure, tiling, loading errors, fine-tuning."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.errors import ModelLoadError, UserError
from core.image_metrics import sr_scores
from models.span import SPAN, Conv3XC, SpanConfig, num_parameters
from pipelines.upscale import default_sr_model_path, load_sr_model, save_sr_model, upscale_image, upscale_tensor
from adapters.conv_lora.layer import ConvLoRA
from trainers.dsclora import DscLoraConfig, affinity_loss, attach_conv_lora, merge_conv_lora, train_dsclora

SHARED = Path(__file__).resolve().parents[2] / "shared"
DSCF = SHARED / "models" / "dscf-x4" / "team23_DSCF.pth"
SET5 = SHARED / "data" / "set5"


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights at PyTorch's default init scale (so activations stay in the range real models have)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    return model


def test_folded_conv3xc_equals_unfolded():
    conv = _randomised(Conv3XC(5, 7))
    x = torch.randn(2, 5, 13, 11)
    with torch.no_grad():
        unfolded = conv(x)
        conv.fold()
        folded = conv(x)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,scale", [(26, 4), (48, 2), (16, 3)])
def test_folded_span_equals_unfolded(channels, scale):
    net = _randomised(SPAN(SpanConfig(channels=channels, scale=scale)), seed=1).eval()
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        a = net(x)
        b = net.reparameterize()(x)
    assert a.shape == (1, 3, 12 * scale, 10 * scale)
    assert (b - a).abs().max().item() < 1e-4 * a.abs().max().item()  # float rounding only


def test_parameter_counts_match_the_papers():
    assert num_parameters(SPAN(SpanConfig(channels=26)).reparameterize()) == 130_828
    assert 420_000 < num_parameters(SPAN(SpanConfig(channels=48)).reparameterize()) < 430_000


def test_conv_lora_starts_at_zero_and_merges_exactly():
    base = torch.nn.Conv2d(4, 6, 3, padding=1)
    layer = ConvLoRA(base, rank=2, alpha=4)
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        start = layer(x)
        torch.testing.assert_close(start, base(x))  # B = 0: the pretrained network
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        unmerged = layer(x)
        original = base.weight.clone()
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    assert layer.lora_A.shape == (2 * 3, 4 * 3) and layer.lora_B.shape == (6 * 3, 2 * 3)
    assert (unmerged - start).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


def test_merged_dsclora_network_is_a_plain_span(tmp_path):
    net = _randomised(SPAN(SpanConfig(channels=16)), seed=2).reparameterize().eval()
    layers = attach_conv_lora(net, DscLoraConfig(hr_folder="", out="x.safetensors"))
    assert len(layers) == 6 * 3 + 2
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        unmerged = net(x)
        merged = merge_conv_lora(net)(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-4)
    assert not any(isinstance(m, ConvLoRA) for m in net.modules())
    path = save_sr_model(net, tmp_path / "m.safetensors")
    again = load_sr_model(path)
    with torch.no_grad():
        torch.testing.assert_close(again.network(x), merged, rtol=1e-5, atol=1e-5)


def test_affinity_loss():
    f = torch.randn(2, 8, 5, 5)
    assert affinity_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert affinity_loss(f, torch.randn(2, 8, 5, 5)).item() > 0.01
    assert affinity_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-6)  # scale-free per position


def test_tiles_join_without_seams():
    net = _randomised(SPAN(SpanConfig(channels=16)), seed=3).reparameterize().eval()
    x = torch.rand(1, 3, 70, 53)
    with torch.no_grad():
        torch.testing.assert_close(upscale_tensor(net, x, 4, tile=24, overlap=24), net(x), rtol=0, atol=1e-5)


def test_loading_refuses_bad_files(tmp_path):
    net = SPAN(SpanConfig(channels=16)).reparameterize()
    good = save_sr_model(net, tmp_path / "good.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(str(good))
    state["conv_cat.weight"] = torch.zeros(16, 60, 1, 1)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ModelLoadError, match="wrong shape conv_cat.weight"):
        load_sr_model(tmp_path / "shape.safetensors")
    del state["conv_cat.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="missing conv_cat.weight"):
        load_sr_model(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match="not a SPAN"):
        load_sr_model(tmp_path / "other.safetensors")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelLoadError, match="--official-pth"):
        load_sr_model(tmp_path / "evil.pth")
    with pytest.raises(ModelLoadError, match="not a plain tensor checkpoint"):
        load_sr_model(tmp_path / "evil.pth", allow_pth=True)
    (tmp_path / "t.safetensors").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="truncated|not a valid"):
        load_sr_model(tmp_path / "t.safetensors")


def test_alpha_is_kept_and_size_is_bounded(tmp_path):
    net = SPAN(SpanConfig(channels=16)).reparameterize().eval()
    model = load_sr_model(save_sr_model(net, tmp_path / "m.safetensors"))
    out = upscale_image(model, Image.new("RGBA", (20, 12), (10, 20, 30, 128)), tile=16)
    assert out.size == (80, 48) and out.mode == "RGBA" and out.getchannel("A").getextrema() == (128, 128)
    with pytest.raises(UserError, match="limit"):
        import os

        os.environ["ATELIER_MAX_UPSCALE_PIXELS"] = "100"
        try:
            upscale_image(model, Image.new("RGB", (20, 20)))
        finally:
            del os.environ["ATELIER_MAX_UPSCALE_PIXELS"]


@pytest.mark.skipif(not (DSCF.is_file() and SET5.is_dir()), reason="reference weights/data in ../shared are absent")
def test_official_weights_reproduce_the_reference_psnr():
    ours, bicubic = _set5_psnr(load_sr_model(DSCF, allow_pth=True))
    assert abs(ours - 31.73) < 0.05 and abs(bicubic - 28.40) < 0.05, (ours, bicubic)


def _set5_psnr(model) -> tuple[float, float]:
    """Mean Y-PSNR of ``model`` and of bicubic on Set5 ×4 (the reference README's protocol)."""
    images = [Image.open(p) for p in sorted(SET5.glob("*.png"))]
    ours = sr_scores(lambda lr: upscale_image(model, lr, tile=0), images)[0]
    return ours, sr_scores(lambda lr: lr.resize((lr.width * 4, lr.height * 4), Image.Resampling.BICUBIC), images)[0]


@pytest.mark.skipif(not SET5.is_dir(), reason="Set5 in ../shared is absent")
def test_shipped_model_beats_bicubic():
    """The default upscaler was trained from scratch here (trainers/sr_pretrain.py); it must earn its place."""
    if not default_sr_model_path().is_file():
        pytest.fail("assets/sr/span-x4-default.safetensors is missing")
    model = load_sr_model()
    assert model.metadata.get("atelier.method") == "span-pretrain"
    ours, bicubic = _set5_psnr(model)
    assert ours > bicubic + 1.0, (ours, bicubic)


def _start_model() -> tuple[Path, bool]:
    if default_sr_model_path().is_file():
        return default_sr_model_path(), False
    if DSCF.is_file():
        return DSCF, True
    pytest.skip("neither the shipped SR model nor the reference weights are available")


def test_dsclora_fine_tune_raises_psnr_on_its_domain(tmp_path):
    """A user's own domain — pixel art (micro-world scenes blown up ×4 with hard pixel edges), which a photo-trained
    upscaler smooths: a short fine-tune on a few such images beats the start model on other images of it."""
    from bench.sr_benchmark import pixel_art_scenes

    start, official = _start_model()
    train_dir = tmp_path / "hr"
    train_dir.mkdir()
    for i, image in enumerate(pixel_art_scenes(8, seed=11)):
        image.save(train_dir / f"{i}.png")
    held_out = pixel_art_scenes(4, seed=999)

    def mean_psnr(model_path: Path, pth: bool) -> float:
        model = load_sr_model(model_path, allow_pth=pth)
        return sr_scores(lambda lr: upscale_image(model, lr, tile=0), held_out)[0]

    before = mean_psnr(start, official)
    torch.manual_seed(0)
    out = tmp_path / "tuned.safetensors"
    result = train_dsclora(DscLoraConfig(hr_folder=str(train_dir), out=str(out), base=str(start),
                                         official_pth=official, steps=150, batch_size=4, patch=16, lr=1e-3),
                           tmp_path / "run")
    after = mean_psnr(out, False)
    print(f"held-out PSNR before {before:.2f} dB, after {after:.2f} dB")
    assert result.status == "done"
    assert after > before + 0.3, (before, after)


def test_output_scale(tmp_path):
    net = SPAN(SpanConfig(channels=16)).reparameterize().eval()
    model = load_sr_model(save_sr_model(net, tmp_path / "m.safetensors"))
    assert upscale_image(model, Image.new("RGB", (20, 10)), outscale=2).size == (40, 20)
    with pytest.raises(UserError, match="between 1 and"):
        upscale_image(model, Image.new("RGB", (20, 10)), outscale=8)


def test_upscale_cli(tmp_path):
    from conftest import run_cli

    net = SPAN(SpanConfig(channels=16)).reparameterize().eval()
    model = save_sr_model(net, tmp_path / "m.safetensors")
    Image.new("RGB", (24, 16), "teal").save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("upscale", str(tmp_path / "a.png"), str(tmp_path / "broken.png"), "--model", str(model),
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "broken.png: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    assert Image.open(tmp_path / "out" / "a_x4.png").size == (96, 64)
    result = run_cli("upscale", str(tmp_path / "a.png"), "--out", str(tmp_path / "o2"),
                     "--model", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2 and "no such SR model file" in result.stderr


def test_dsclora_stop_asked_for_while_it_starts_is_honoured_once(tmp_path):
    """A Stop clicked while the job was still loading (the STOP file exists before the first step) ends the run after
    that step with a checkpoint; the resumed run is not stopped again by the same request."""
    from trainers.loop import STOP_FILE

    net = SPAN(SpanConfig(channels=16)).reparameterize().eval()
    start = save_sr_model(net, tmp_path / "start.safetensors")
    train_dir = tmp_path / "hr"
    train_dir.mkdir()
    for i in range(2):
        Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB").save(train_dir / f"{i}.png")
    config = DscLoraConfig(hr_folder=str(train_dir), out=str(tmp_path / "tuned.safetensors"), base=str(start),
                           steps=3, batch_size=2, patch=16, checkpoint_every=100)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STOP_FILE).write_text("stop requested\n")
    result = train_dsclora(config, run_dir)
    assert (result.status, result.step) == ("stopped", 1)
    assert not (run_dir / STOP_FILE).exists()
    result = train_dsclora(config, run_dir, resume=True)
    assert (result.status, result.step) == ("done", 3) and (tmp_path / "tuned.safetensors").is_file()


def test_dsclora_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Stop after 3 of 6 steps (the STOP file, as the Stop button writes it), resume: the merged upscaler equals an
    uninterrupted run's, and the event log tells one stop, one resume and every step once."""
    from safetensors.torch import load_file

    from trainers.hr_crops import HRCrops
    from training_data import assert_one_stop_and_resume, stopping_after

    start = save_sr_model(SPAN(SpanConfig(channels=16)).reparameterize().eval(), tmp_path / "start.safetensors")
    train_dir = tmp_path / "hr"
    train_dir.mkdir()
    for i in range(3):
        Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB").save(train_dir / f"{i}.png")

    def config(out: str) -> DscLoraConfig:
        return DscLoraConfig(hr_folder=str(train_dir), out=str(tmp_path / out), base=str(start), steps=6,
                             batch_size=2, patch=16, checkpoint_every=2, seed=4)

    assert train_dsclora(config("a.safetensors"), tmp_path / "a").status == "done"
    run_dir, batch = tmp_path / "b", HRCrops.batch
    monkeypatch.setattr(HRCrops, "batch", stopping_after(3, run_dir, batch))
    stopped = train_dsclora(config("b.safetensors"), run_dir)
    assert (stopped.status, stopped.step) == ("stopped", 3)
    monkeypatch.setattr(HRCrops, "batch", batch)
    result = train_dsclora(config("b.safetensors"), run_dir, resume=True)
    assert (result.status, result.step) == ("done", 6)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert_one_stop_and_resume(run_dir, 6)


def test_sr_pretraining_stopped_and_rerun_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """SR pretraining runs through the run loop: a stop after 3 of 6 steps, then the same command again, gives the
    uninterrupted run's model (to 1e-6) and a sane event log."""
    from safetensors.torch import load_file

    from trainers.hr_crops import HRCrops
    from trainers.sr_pretrain import TRAIN_PHOTOS, PretrainConfig, pretrain
    from training_data import assert_one_stop_and_resume, stopping_after

    photos = tmp_path / "photos"  # stand-ins for scikit-image's photos (written only when missing)
    photos.mkdir()
    for i, name in enumerate(TRAIN_PHOTOS):
        Image.effect_noise((40, 40), 30 + 5 * i).convert("RGB").save(photos / f"{name}.png")

    def config(out: str) -> PretrainConfig:
        return PretrainConfig(out=str(tmp_path / out), photos=str(photos), channels=8, scale=2, steps=6,
                              batch_size=2, patch=8, checkpoint_every=2, seed=1)

    assert pretrain(config("a.safetensors"), tmp_path / "a", log=lambda line: None).status == "done"
    run_dir, batch = tmp_path / "b", HRCrops.batch
    monkeypatch.setattr(HRCrops, "batch", stopping_after(3, run_dir, batch))
    stopped = pretrain(config("b.safetensors"), run_dir, log=lambda line: None)
    assert (stopped.status, stopped.step) == ("stopped", 3) and not (tmp_path / "b.safetensors").exists()
    monkeypatch.setattr(HRCrops, "batch", batch)
    assert pretrain(config("b.safetensors"), run_dir, log=lambda line: None).step == 6
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert_one_stop_and_resume(run_dir, 6)


def test_hr_crops_hold_out_every_eighth_image_and_give_the_same_validation_crops(tmp_path):
    from trainers.hr_crops import HRCrops

    for i in range(9):
        Image.new("RGB", (32, 32), (i * 25, 0, 0)).save(tmp_path / f"{i}.png")
    data = HRCrops(str(tmp_path), 2, 8, seed=0, hold_out_every=8)
    assert len(data.images) == 8 and [im[0, 0, 0] for im in data.held_out] == [7 * 25]  # image 7 only
    lr, hr, held_out = data.validation(4)
    assert held_out and set(hr[:, 0].flatten().mul(255).round().tolist()) == {175.0}  # only the held-out image
    torch.testing.assert_close(data.validation(4)[1], hr)  # the same crops every time
    few = HRCrops(str(tmp_path), 2, 8, seed=0, hold_out_every=16)
    assert not few.held_out and few.validation(4)[2] is False


@pytest.mark.parametrize("lr, warned", [(0.0, False), (1.0, True)])
def test_dsclora_ends_with_warnings_when_it_upscales_held_out_crops_worse_than_its_start(tmp_path, lr, warned):
    """The target of an SR fine-tune: PSNR on held-out crops not below the start model's. An absurd learning rate
    wrecks the model and the run says so (events, result, file); an unchanged model (lr 0) meets it."""
    from core.safetensors_files import read_metadata
    from trainers.events import read_events

    start = save_sr_model(SPAN(SpanConfig(channels=16)).reparameterize().eval(), tmp_path / "start.safetensors")
    train_dir = tmp_path / "hr"
    train_dir.mkdir()
    for i in range(8):
        Image.effect_noise((48, 48), 30 + 5 * i).convert("RGB").save(train_dir / f"{i}.png")
    out = tmp_path / "tuned.safetensors"
    result = train_dsclora(DscLoraConfig(hr_folder=str(train_dir), out=str(out), base=str(start), steps=4,
                                         batch_size=2, patch=12, lr=lr, seed=1), tmp_path / "run")
    check = [e for e in read_events(tmp_path / "run") if e.get("event") == "validation"][-1]
    assert check["held_out"] is True and check["crops"] == 16
    assert (check["psnr"] is None or check["psnr"] < check["start_psnr"]) is warned  # None: NaN, diverged
    ours = [w for w in result.warnings if "below the start model's" in w]  # (4 steps also warn: too few to judge)
    assert bool(ours) is warned and result.label == "done with warnings"
    if warned:
        assert "16 held-out crops" in ours[0] and ours[0] in read_metadata(out)["atelier.warnings"]
