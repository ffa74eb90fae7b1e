"""Measuring a watermark: marked images made by an extractor's own encoder, and fresh generations with and without
a watermark adapter. Shared by the effect tests and the benchmarks, so both measure the same way."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from pipelines.generation import GenerationRequest, generate
from microworld.scenes import SceneConfig, generate_scenes

from pipelines.watermark.verify import image_tensor, read_bits


@torch.no_grad()
def encoder_marked(encoder, image: Image.Image, key: torch.Tensor, rng: random.Random) -> Image.Image:
    """``image`` with ``key`` (0/1, shape (k,)) written by ``encoder``, as the 8-bit image a user would save."""
    marked = encoder(image_tensor(image), key[None], rng)[0]
    return Image.fromarray(((marked.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def bit_accuracy(extractor, image: Image.Image, key: torch.Tensor) -> float:
    return float((read_bits(extractor, image) == key).float().mean())


def fresh_requests(n: int, seed: int = 0) -> list:
    """The ``n`` generation requests :func:`fresh_generations` makes: micro-world prompts (not the training ones),
    20 steps, one seed each."""
    return [GenerationRequest(prompt=scene.caption, steps=20, seed=70_000 + i)
            for i, scene in enumerate(generate_scenes(n, seed=4_000 + seed, config=SceneConfig()))]


def fresh_generations(model, watermark: Path, n: int, seed: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
    """``n`` micro-world prompts (not the training ones) generated with and without ``watermark``, seed by seed."""
    plain, marked = [], []
    for request in fresh_requests(n, seed):
        plain.append(next(generate(model, request)).image)
        marked.append(next(generate(model, GenerationRequest(**{**request.__dict__, "watermark": str(watermark)}))).image)
    return plain, marked
