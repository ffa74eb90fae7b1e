"""The shipped extractor reads keys its encoder wrote, and its bits on clean images behave like fair coins.

Thresholds sit below ``bench/results/watermark_extractor.md`` (48 marked scenes: 0.84 clean, 0.83 after a 50 % crop;
1000 clean scenes: 23.9 ± 3.4 matched bits, 6 flagged at FPR 1e-2).
"""
from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from pipelines.watermark.shipped import ASSETS, EXTRACTOR_FILE

pytestmark = pytest.mark.skipif(not (ASSETS / EXTRACTOR_FILE).is_file(), reason="watermark extractor not shipped")


def marked_image(encoder, scene, key, rng) -> Image.Image:
    from pipelines.watermark.verify import image_tensor

    with torch.no_grad():
        marked = encoder(image_tensor(scene.to_pil()), key[None], rng)[0]
    return Image.fromarray(((marked.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def test_shipped_extractor_reads_keys_its_encoder_wrote():
    from pipelines.microworld.scenes import SceneConfig, generate_scenes
    from pipelines.watermark.attacks import attack_image
    from pipelines.watermark.extractor import load_encoder, load_extractor
    from pipelines.watermark.verify import read_bits

    extractor = load_extractor(ASSETS / EXTRACTOR_FILE)
    encoder = load_encoder((ASSETS / EXTRACTOR_FILE).with_suffix(".encoder.safetensors"))
    rng, gen = random.Random(5), torch.Generator().manual_seed(5)
    clean, cropped = [], []
    for scene in generate_scenes(24, seed=31_000, config=SceneConfig()):
        key = torch.randint(0, 2, (48,), generator=gen).float()
        image = marked_image(encoder, scene, key, rng)
        clean.append(float((read_bits(extractor, image) == key).float().mean()))
        cropped.append(float((read_bits(extractor, attack_image(image, "crop 50 %")) == key).float().mean()))
    print(f"bit accuracy: clean {sum(clean) / 24:.3f}, crop 50 % {sum(cropped) / 24:.3f}")
    assert sum(clean) / 24 >= 0.75
    assert sum(cropped) / 24 >= 0.7


def test_clean_images_match_a_random_key_like_fair_coins():
    from pipelines.microworld.scenes import SceneConfig, generate_scenes
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
