"""The shipped extractor reads keys its encoder wrote, and its bits on clean images behave like fair coins.

Thresholds sit below ``bench/results/watermark_extractor.md`` (48 marked scenes: 0.84 clean, 0.83 after a 50 % crop;
1000 clean scenes: 23.9 ± 3.4 matched bits, 6 flagged at FPR 1e-2).
"""
from __future__ import annotations

import random

import pytest
import torch

from pipelines.watermark.shipped import ASSETS, EXTRACTOR_FILE

pytestmark = pytest.mark.skipif(not (ASSETS / EXTRACTOR_FILE).is_file(), reason="watermark extractor not shipped")


def test_shipped_extractor_reads_keys_its_encoder_wrote():
    from microworld.scenes import SceneConfig, generate_scenes
    from pipelines.watermark.attacks import attack_image
    from microworld.watermark_evaluation import bit_accuracy, encoder_marked
    from pipelines.watermark.extractor import load_encoder, load_extractor

    extractor = load_extractor(ASSETS / EXTRACTOR_FILE)
    encoder = load_encoder((ASSETS / EXTRACTOR_FILE).with_suffix(".encoder.safetensors"))
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    clean, cropped = [], []
    for scene in generate_scenes(24, seed=31_000, config=SceneConfig()):
        key = torch.randint(0, 2, (48,), generator=gen).float()
        image = encoder_marked(encoder, scene.to_pil(), key, rng)
        clean.append(bit_accuracy(extractor, image, key))
        cropped.append(bit_accuracy(extractor, attack_image(image, "crop 50 %"), key))
    print(f"bit accuracy: clean {sum(clean) / 24:.3f}, crop 50 % {sum(cropped) / 24:.3f}")
    assert sum(clean) / 24 >= 0.75
    assert sum(cropped) / 24 >= 0.7


def test_clean_images_match_a_random_key_like_fair_coins():
    from microworld.scenes import SceneConfig, generate_scenes
    from pipelines.watermark.extractor import load_extractor
    from pipelines.watermark.stats import threshold
    from pipelines.watermark.verify import read_bits

    extractor = load_extractor(ASSETS / EXTRACTOR_FILE)
    gen = torch.Generator().manual_seed(9)
    matched = [int((read_bits(extractor, scene.to_pil()) == torch.randint(0, 2, (48,), generator=gen).float()).sum())
               for scene in generate_scenes(300, seed=32_000, config=SceneConfig())]
    mean = sum(matched) / len(matched)
    flagged = sum(m >= threshold(48, 1e-2) for m in matched)
    print(f"clean: {mean:.2f} matched bits on average, {flagged} of 300 flagged at FPR 1e-2")
    assert abs(mean - 24) < 1.0
    assert flagged <= 9  # Bin(300, 0.01): 3 expected, P(≥ 10) ≈ 0.001
    assert max(matched) < threshold(48, 1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_a_short_watermark_training_marks_fresh_generations(tmp_path):
    """The benchmark's recipe (bench/results/watermark_microworld.md: 200 steps, lr 5e-4, 32 latents; 16 fresh
    generations at 0.97 bit accuracy, 15/16 flagged at FPR 1e-6, none without the watermark, PSNR 24.3 dB)."""
    import numpy as np

    from conftest import MICRO_MODEL
    from core.image_metrics import psnr
    from models.loading import load_model
    from microworld.watermark_evaluation import fresh_generations
    from pipelines.watermark.extractor import load_extractor
    from pipelines.watermark.verify import verify
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    key = "5c3a9e1f07b2"
    model = load_model(MICRO_MODEL)
    run = train_watermark(WatermarkConfig(out=str(tmp_path / "wm.safetensors"), key=key, max_steps=200, latents=32,
                                          lr=5e-4), tmp_path / "run", model=model)
    assert run.history[-1]["bit_accuracy"] > run.history[0]["bit_accuracy"]
    extractor = load_extractor(ASSETS / EXTRACTOR_FILE)
    plain, marked = fresh_generations(model, tmp_path / "wm.safetensors", 8)
    on = verify([(str(i), im) for i, im in enumerate(marked)], key, extractor)
    off = verify([(str(i), im) for i, im in enumerate(plain)], key, extractor)
    quality = float(np.mean([psnr(np.asarray(a), np.asarray(b)) for a, b in zip(plain, marked)]))
    accuracy = sum(v.bit_accuracy for _, v in on.per_image) / 8
    print(f"watermarked: bit accuracy {accuracy:.3f}, {sum(v.watermarked for _, v in on.per_image)}/8 flagged; "
          f"plain: {sum(v.watermarked for _, v in off.per_image)}/8 flagged; PSNR {quality:.1f} dB")
    assert accuracy >= 0.85
    assert sum(v.watermarked for _, v in on.per_image) >= 5
    assert not any(v.watermarked for _, v in off.per_image)
    assert on.pooled.watermarked and not off.pooled.watermarked
    assert quality >= 20.0
