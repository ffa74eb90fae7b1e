"""Measuring a watermark: marked images made by an extractor's own encoder, and fresh generations with and without
a watermark adapter. Shared by the effect tests and the benchmarks, so both measure the same way."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from pipelines.generation import GenerationRequest, generate
from microworld.evaluation import caption_shown
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
            for i, scene in enumerate(fresh_scenes(n, seed))]


def fresh_scenes(n: int, seed: int = 0) -> list:
    """The micro-world scenes whose captions :func:`fresh_requests` prompts with (their objects label the images)."""
    return generate_scenes(n, seed=4_000 + seed, config=SceneConfig())


def fresh_generations(model, watermark: Path, n: int, seed: int = 0) -> tuple[list[Image.Image], list[Image.Image]]:
    """``n`` micro-world prompts (not the training ones) generated with and without ``watermark``, seed by seed."""
    plain, marked = [], []
    for request in fresh_requests(n, seed):
        plain.append(next(generate(model, request)).image)
        marked.append(next(generate(model, GenerationRequest(**{**request.__dict__, "watermark": str(watermark)}))).image)
    return plain, marked


def content_kept(images: list[Image.Image], n: int, seed: int = 0) -> dict[str, float]:
    """Share of :func:`fresh_generations`' images (either half) that show every object their caption names: old
    judge (the CNN's labels), new judge (well formed), new judge with positions (:func:`caption_shown`) — a
    watermark should leave what the image shows alone."""
    shown = [caption_shown(image, [(o.color, o.shape, o.position) for o in scene.objects])
             for image, scene in zip(images, fresh_scenes(n, seed))]
    return {key: sum(s[key] for s in shown) / len(shown) for key in ("old", "new", "new_position")}
