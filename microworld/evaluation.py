"""Measuring an adapter in the micro world: the data a concept is taught from, and what the judge sees afterwards.

Shared by the effect tests and the benchmarks, so both teach and judge a concept the same way.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from pipelines.generation import adapters_applied

from microworld.judge import judge_images
from microworld.scenes import COLORS, FILL_ADJECTIVES, SceneConfig, generate_scene, restrict, write_dataset


def novel_shape_set(folder: Path, shape: str, n: int, *, seed: int = 3) -> Path:
    """``n`` one-object scenes of ``shape`` with the generator's captions (a trainer adds the trigger)."""
    write_dataset(Path(folder), n, seed=seed,
                  config=restrict(SceneConfig(min_radius=0.2, max_radius=0.3), shape=shape, objects=1))
    return Path(folder)


def novel_fill_set(folder: Path, fill: str, n: int, *, seed: int = 5) -> Path:
    """``n`` one-object base-set shapes drawn with ``fill``; the fill's word is taken out of the captions, so only a
    trigger can carry it (a style to learn)."""
    folder = Path(folder)
    write_dataset(folder, n, seed=seed, config=restrict(SceneConfig(min_radius=0.2, max_radius=0.3), fill=fill,
                                                        objects=1))
    word = re.compile(rf"\b{FILL_ADJECTIVES[fill]} ")
    for caption in folder.glob("*.txt"):
        caption.write_text(word.sub("", caption.read_text(encoding="utf-8")), encoding="utf-8")
    return folder


def base_set(folder: Path, n: int, *, seed: int = 4, min_radius: float = 0.13) -> Path:
    """``n`` one-object base-set scenes, captions as written: what the base model already draws (prior
    preservation, Break-for-Make's auxiliary sets). Objects from ``min_radius`` to 0.3 of the image."""
    write_dataset(Path(folder), n, seed=seed,
                  config=SceneConfig(min_radius=min_radius, max_radius=0.3, max_objects=1))
    return Path(folder)


def base_prompts(n: int, seed: int) -> list[dict]:
    """``n`` one-object base-set prompts with their labels and a sampling seed each."""
    out = []
    for i in range(n):
        obj_scene = generate_scene([seed, 7, i], SceneConfig(max_objects=1))
        obj = obj_scene.objects[0]
        out.append({"prompt": obj_scene.caption, "color": obj.color, "shape": obj.shape, "seed": seed * 1000 + i})
    return out


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], *, steps: int = 20, guidance: float = 4.0,
           chunk: int = 12) -> list:
    """Images of ``prompts``, one seed each, at the micro model's 64 px (in chunks to bound memory)."""
    images = []
    for start in range(0, len(prompts), chunk):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + chunk]]
        images += pipe(prompts[start:start + chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, height=64, width=64).images
    return images


def concept_and_prior(model, adapters: tuple, concept_prompt: str, shape: str, n: int, seed: int) -> dict:
    """With ``adapters`` ((file, strength), ...) applied: *learned* = share of ``concept_prompt`` samples the judge
    reads as ``shape``; *prior* = share of base-set prompts whose shape and colour both come out right."""
    prior = base_prompts(n, seed)
    with adapters_applied(model, adapters):
        learned = judge_images(sample(model.pipe, [concept_prompt] * n, [seed * 1000 + 500 + i for i in range(n)]))
        kept = judge_images(sample(model.pipe, [p["prompt"] for p in prior], [p["seed"] for p in prior]))
    return {"learned": sum(v["shape"] == shape for v in learned) / n,
            "prior": sum(v["shape"] == p["shape"] and v["color"] == p["color"] for v, p in zip(kept, prior)) / n}


@torch.no_grad()
def content_and_style(model, adapters: tuple, shape: str, fill: str, triggers: str, n_seeds: int, seed: int) -> dict:
    """With ``adapters`` applied, samples of "<triggers> a <colour> <shape> in the center, gray background" in every
    base colour × ``n_seeds`` seeds: the shares the judge reads as ``shape`` (content), as ``fill`` (style), and as
    both in one image."""
    prompts, seeds = [], []
    for c_index, color in enumerate(COLORS):
        for i in range(n_seeds):
            prompts.append(f"{triggers} a {color} {shape} in the center, gray background")
            seeds.append(seed * 1000 + c_index * 50 + i)
    with adapters_applied(model, adapters):
        verdicts = judge_images(sample(model.pipe, prompts, seeds))
    content = sum(v["shape"] == shape for v in verdicts) / len(verdicts)
    style = sum(v["fill"] == fill for v in verdicts) / len(verdicts)
    both = sum(v["shape"] == shape and v["fill"] == fill for v in verdicts) / len(verdicts)
    return {"content": content, "style": style, "both": both, "product": content * style, "samples": len(verdicts)}
