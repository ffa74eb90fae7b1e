"""The extractor's pieces: attacks, the differentiable JPEG, whitening, files."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ModelLoadError
from microworld.scenes import SceneConfig, generate_scene
from pipelines.watermark.attacks import ATTACKS, attack_image, diff_jpeg, noise_layer
from pipelines.watermark.extractor import BitEncoder, BitExtractor, ExtractorConfig, extractor_hash, \
    load_extractor, save_extractor


def scene_tensor(seed: int, size: int = 64) -> tuple[Image.Image, torch.Tensor]:
    image = generate_scene(seed, SceneConfig(size=size)).to_pil()
    return image, torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.parametrize("quality", [50, 80])
def test_differentiable_jpeg_is_close_to_real_jpeg_and_passes_gradients(quality):
    image, x = scene_tensor(3, 64)
    real = to_tensor(attack_image(image, f"JPEG {quality}"))
    x.requires_grad_(True)
    approx = diff_jpeg(x, quality)
    # Closer to the real JPEG than the untouched image is, and it changed the image like JPEG does.
    assert (approx - real).abs().mean() < (x - real).abs().mean()
    assert (approx - x).abs().mean() > 1e-3
    approx.sum().backward()
    assert x.grad is not None and x.grad.abs().mean() > 0.01


def test_noise_layer_keeps_gradients_for_every_distortion():
    _, x = scene_tensor(4, 64)
    rng = random.Random(0)
    for _ in range(40):
        y = x.clone().requires_grad_(True)
        out = noise_layer(y, rng)
        assert out.shape[:2] == (1, 3) and min(out.shape[2:]) >= 16
        out.mean().backward()
        assert y.grad is not None


def test_every_attack_gives_an_rgb_image():
    image, _ = scene_tensor(5, 64)
    for name in ATTACKS:
        out = attack_image(image, name)
        assert out.mode == "RGB" and min(out.size) >= 8
    assert attack_image(image, "crop 10 %").size == (20, 20)
    assert attack_image(image, "resize 0.5").size == (32, 32)
    with pytest.raises(KeyError):
        attack_image(image, "shred")


def test_whitening_gives_zero_mean_identity_covariance():
    torch.manual_seed(0)
    extractor = BitExtractor(ExtractorConfig(bits=8, filters=8, kernel=3)).eval()
    # Raw outputs with correlated bits and an offset, as a trained extractor's are on clean images.
    mixing, offset = torch.randn(8, 8), torch.randn(8)
    extractor.raw = lambda x: x.flatten(1)[:, :8] @ mixing + offset
    images = torch.rand(400, 3, 4, 4) * 2 - 1
    assert not extractor.whitened
    extractor.fit_whitening(images)
    assert extractor.whitened
    with torch.no_grad():
        out = extractor(images).double()
    assert out.mean(dim=0).abs().max() < 1e-3
    assert torch.allclose(torch.cov(out.T), torch.eye(8, dtype=torch.float64), atol=2e-2)


def test_extractor_files_round_trip_and_refuse_tampering(tmp_path):
    torch.manual_seed(1)
    extractor = BitExtractor(ExtractorConfig(bits=16, filters=8, kernel=3)).eval()
    path = save_extractor(extractor, tmp_path / "x.safetensors")
    loaded = load_extractor(path)
    assert extractor_hash(loaded) == extractor_hash(extractor)
    x = torch.rand(2, 3, 40, 56) * 2 - 1  # any size: convolutions and global pooling
    assert torch.equal(loaded(x), extractor(x))
    from safetensors.torch import load_file, save_file

    from core.safetensors_files import read_metadata

    state, meta = load_file(str(path)), read_metadata(path)
    state["head.bias"] = state["head.bias"] + 0.01
    save_file(state, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(ModelLoadError, match="hash"):
        load_extractor(tmp_path / "tampered.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        load_extractor(tmp_path / "pickle.safetensors")


def test_encoder_residual_is_bounded():
    encoder = BitEncoder(ExtractorConfig(bits=8), strength=0.05, tile=4)
    x = torch.rand(2, 3, 30, 34) * 1.8 - 0.9
    y = encoder(x, torch.randint(0, 2, (2, 8)).float(), random.Random(0))
    assert y.shape == x.shape and (y - x).abs().max() <= 0.05 + 1e-6


def test_extractor_training_writes_a_whitened_extractor_and_its_encoder(tmp_path):
    from core.safetensors_files import read_metadata
    from pipelines.watermark.extractor import load_encoder
    from trainers.watermark_extractor import ExtractorTrainConfig, train_extractor

    logged = []
    config = ExtractorTrainConfig(out=str(tmp_path / "ex.safetensors"), bits=16, filters=8, kernel=3, tile=4,
                                  steps=4, batch_size=4, sizes=(32,), microworld=16,
                                  whiten_images=64, folder=None)
    summary = train_extractor(config, log=logged.append)
    extractor = load_extractor(tmp_path / "ex.safetensors")
    assert extractor.whitened and extractor_hash(extractor) == summary["hash"]
    assert read_metadata(tmp_path / "ex.safetensors")["extractor.whitened"] == "true"
    encoder = load_encoder(tmp_path / "ex.encoder.safetensors")
    assert encoder.config.bits == 16 and logged and logged[-1]["step"] == 4


def test_the_owners_folder_keeps_16_bit_images_and_names_the_files_it_skips(tmp_path):
    from trainers.watermark_extractor import ExtractorTrainConfig, image_pool

    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 8)  # a 16-bit ramp, 0 … 32760
    Image.fromarray(values).save(tmp_path / "deep.png")  # PIL stores it as I;16
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    logged: list[dict] = []
    pool = image_pool(ExtractorTrainConfig(out=str(tmp_path / "x.safetensors"), folder=str(tmp_path)), logged.append)
    assert len(pool) == 1 and pool[0].shape == (64, 64, 3)
    assert 40 < pool[0].mean() < 90  # a ramp to half of full scale, not clipped to white
    assert [(e["event"], e["file"]) for e in logged] == [("skipped", "broken.png")]


def test_extractor_training_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """The extractor trains through the run loop: a stop after 3 of 6 steps and ``watermark train-extractor
    --resume RUN_DIR`` give the uninterrupted run's extractor and encoder (to 1e-6) and a sane event log."""
    from safetensors.torch import load_file

    import launch
    from trainers import watermark_extractor
    from trainers.watermark_extractor import ExtractorTrainConfig, train_extractor
    from training_data import assert_one_stop_and_resume, stopping_after

    def config(out: str) -> ExtractorTrainConfig:
        return ExtractorTrainConfig(out=str(tmp_path / out), bits=16, filters=8, kernel=3, tile=4, steps=6,
                                    batch_size=4, sizes=(32, 40), microworld=16, whiten_images=64, checkpoint_every=2,
                                    noise_probability=0.5, seed=2)

    assert train_extractor(config("a.safetensors"), log=lambda entry: None)["status"] == "done"
    run_dir, batch = tmp_path / "b-run", watermark_extractor.random_batch
    monkeypatch.setattr(watermark_extractor, "random_batch", stopping_after(3, run_dir, batch))  # once a step
    stopped = train_extractor(config("b.safetensors"), log=lambda entry: None, run_dir=run_dir)
    assert (stopped["status"], stopped["steps"]) == ("stopped", 3) and not (tmp_path / "b.safetensors").exists()
    monkeypatch.setattr(watermark_extractor, "random_batch", batch)
    assert launch.main(["watermark", "train-extractor", "--resume", str(run_dir)]) == 0
    for name in ("{}.safetensors", "{}.encoder.safetensors"):
        a, b = load_file(str(tmp_path / name.format("a"))), load_file(str(tmp_path / name.format("b")))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert_one_stop_and_resume(run_dir, 6)
