"""Auxiliary image sets for Break-for-Make's stage 1 (and prior preservation): where a studio gets them.

A user may point at folders of their own; otherwise the base model draws class images from class prompts (as
DreamBooth's prior images), or — on the micro model — the scene generator writes base-set scenes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from core.errors import UserError
from models.loading import is_micro_model


def generate_class_images(model, prompts: list[str], per_prompt: int, folder: Path, *, seed: int = 0,
                          steps: int = 20, guidance: float = 4.0,
                          progress: Callable[[int, int], None] | None = None) -> Path:
    """``per_prompt`` images of each prompt from ``model`` (a loaded studio model), with the prompt as caption."""
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts or per_prompt < 1:
        raise UserError("class images need at least one prompt and a count of at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = model.pipe
    size = model.native_size
    total, done = len(prompts) * per_prompt, 0
    for p_index, prompt in enumerate(prompts):
        for i in range(per_prompt):
            generator = torch.Generator("cpu").manual_seed(seed * 100_003 + p_index * 1009 + i)
            image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                         height=size, width=size).images[0]
            stem = f"class-{p_index:02d}-{i:04d}"
            image.save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(prompt + "\n", encoding="utf-8")
            done += 1
            if progress:
                progress(done, total)
    return folder


def check_microworld_model(model: str | Path | None) -> None:
    """Refuse micro-world sets for any model but the shipped micro model (``None``: the embedded default). Only it
    draws the micro world; on another model (an SDXL, an SD 1.5) those scenes would teach the auxiliary half a
    world the model does not know, so it is said at once, before anything is drawn or loaded."""
    if not is_micro_model(model):
        raise UserError(f"--aux-microworld is for the shipped micro-world model only, not {model}: give your own "
                        "auxiliary images with --aux DIR, or let the model draw them with --aux-prompt")


def microworld_aux(folder: Path, count: int, *, seed: int = 0, model: str | Path | None = None) -> Path:
    """Micro-world auxiliary set: one-object base-set scenes, what the base model already draws. They are the
    world's auxiliary contents *and* styles: the half they train learns the general mapping and no new concept
    (novel fills there would teach that half a texture every prompt then gets). ``model`` is the model the set is
    for: anything but the micro model is refused (:func:`check_microworld_model`)."""
    from microworld.evaluation import base_set

    check_microworld_model(model)
    return base_set(folder, count, seed=seed)
