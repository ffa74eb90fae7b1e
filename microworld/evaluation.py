"""Measuring an adapter in the micro world: the data a concept is taught from, and what the judge sees afterwards.

Shared by the effect tests and the benchmarks, so both teach and judge a concept the same way.

Every measure comes twice: under its old key the old judge's figure (the CNN's labels alone, as it always was), and
under ``<key>_new`` the new judge's (:func:`microworld.judge.is_right`: the object is well formed — verdict ``ok``,
its fidelity to the shape it names at least that shape's threshold, :func:`microworld.fidelity.name_shape` — and
the named shape and colour match); where
the prompts name a position, ``<key>_new_position`` also asks for the object's centroid in the named place.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch

from pipelines.generation import adapters_applied

from microworld.judge import is_right, judge_images, judge_scene
from microworld.scenes import (COLORS, FILL_ADJECTIVES, SceneConfig, generate_scene, parse_caption, restrict,
                               write_dataset)

CONTENT_STYLE_POSITION = "in the center"  # where content_and_style's prompts put the object


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
        out.append({"prompt": obj_scene.caption, "color": obj.color, "shape": obj.shape, "position": obj.position,
                    "seed": seed * 1000 + i})
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


def _share(flags) -> float:
    flags = list(flags)
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def _well_formed(v: dict) -> bool:
    return v.get("verdict") == "ok"


def named_position(prompt: str) -> str | None:
    """The position the (one-object) prompt names, if any ("sks a red star in the center, ..." → "in the center")."""
    objects, _ = parse_caption(prompt)
    return objects[0]["position"] if len(objects) == 1 else None


def named_found(named: list[tuple[str, str, str | None]], records: list[dict]) -> list[bool]:
    """Per named (colour, shape, position) object: whether it is found as its own well-formed object of that shape
    and colour (and, where ``position`` is given, in that place) — distinct records for distinct named objects,
    the assignment that finds the most."""
    best: tuple[bool, ...] = (False,) * len(named)
    slots = list(range(len(records))) + [None] * len(named)  # None: this named object is not found
    for choice in itertools.permutations(slots, len(named)):
        hits = tuple(i is not None and is_right(records[i], shape, color, where)
                     for i, (color, shape, where) in zip(choice, named))
        if sum(hits) > sum(best):
            best = hits
            if all(best):
                break
    return list(best)


def caption_shown(image, named: list[tuple[str, str, str | None]]) -> dict[str, bool]:
    """Does ``image`` show every named (colour, shape, position) object of its caption? ``old``: each (colour,
    shape) pair among the CNN's labels of the scene's objects; ``new``: each as its own well-formed object;
    ``new_position``: and in its named place (:func:`named_found`)."""
    records = judge_scene(image)
    labels = {(r["color"], r["shape"]) for r in records}
    return {"old": all((color, shape) in labels for color, shape, _ in named),
            "new": all(named_found([(color, shape, None) for color, shape, _ in named], records)),
            "new_position": all(named_found(named, records))}


def concept_rates(learned: list[dict], kept: list[dict], prior: list[dict], shape: str,
                  concept_position: str | None = None) -> dict:
    """The figures of :func:`concept_and_prior` from judged records: ``learned`` (the concept prompt's samples),
    ``kept`` (the base prompts' samples, labelled by ``prior``). Old judge under ``learned``/``prior``; new judge
    under ``*_new`` (well formed and labels right), ``*_new_position`` (and in the named place), and the shares of
    samples the new judge finds ``malformed`` or ``empty``."""
    rates = {
        "learned": _share(v["shape"] == shape for v in learned),
        "prior": _share(v["shape"] == p["shape"] and v["color"] == p["color"] for v, p in zip(kept, prior)),
        "learned_new": _share(_well_formed(v) and v.get("named_shape") == shape for v in learned),
        "prior_new": _share(is_right(v, p["shape"], p["color"]) for v, p in zip(kept, prior)),
        "prior_new_position": _share(is_right(v, p["shape"], p["color"], p.get("position"))
                                     for v, p in zip(kept, prior)),
        "learned_malformed": _share(v.get("verdict") == "malformed" for v in learned),
        "learned_empty": _share(v.get("verdict") == "empty" for v in learned),
        "prior_malformed": _share(v.get("verdict") == "malformed" for v in kept),
        "prior_empty": _share(v.get("verdict") == "empty" for v in kept),
    }
    if concept_position:
        rates["learned_new_position"] = _share(_well_formed(v) and v.get("named_shape") == shape
                                               and v.get("position") == concept_position for v in learned)
    rates["malformed"] = _share(v.get("verdict") == "malformed" for v in [*learned, *kept])
    return rates


def concept_and_prior(model, adapters: tuple, concept_prompt: str, shape: str, n: int, seed: int) -> dict:
    """With ``adapters`` ((file, strength), ...) applied: *learned* = share of ``concept_prompt`` samples the judge
    reads as ``shape``; *prior* = share of base-set prompts whose shape and colour both come out right. Old and new
    judge side by side (:func:`concept_rates`); the base prompts name a position, and so may ``concept_prompt``."""
    prior = base_prompts(n, seed)
    with adapters_applied(model, adapters):
        learned = judge_images(sample(model.pipe, [concept_prompt] * n, [seed * 1000 + 500 + i for i in range(n)]))
        kept = judge_images(sample(model.pipe, [p["prompt"] for p in prior], [p["seed"] for p in prior]))
    return concept_rates(learned, kept, prior, shape, named_position(concept_prompt))


def content_style_rates(verdicts: list[dict], shape: str, fill: str,
                        position: str | None = CONTENT_STYLE_POSITION) -> dict:
    """The figures of :func:`content_and_style` from judged records. Old judge: ``content`` (shape read),
    ``style`` (fill read), ``both`` in one image, ``product``. New judge (the object well formed): ``content_new``,
    ``style_new`` (the fill read on a well-formed object), ``both_new``, ``product_new``; ``content_new_position``
    and ``both_new_position`` also ask for the object in ``position``; ``malformed`` and ``empty``: shares of the
    samples with that verdict."""
    content = _share(v["shape"] == shape for v in verdicts)
    style = _share(v["fill"] == fill for v in verdicts)
    content_new = _share(_well_formed(v) and v.get("named_shape") == shape for v in verdicts)
    style_new = _share(_well_formed(v) and v["fill"] == fill for v in verdicts)
    rates = {"content": content, "style": style,
             "both": _share(v["shape"] == shape and v["fill"] == fill for v in verdicts),
             "product": content * style,
             "content_new": content_new, "style_new": style_new,
             "both_new": _share(_well_formed(v) and v.get("named_shape") == shape and v["fill"] == fill for v in verdicts),
             "product_new": content_new * style_new}
    if position:
        here = [v.get("position") == position for v in verdicts]
        rates["content_new_position"] = _share(_well_formed(v) and v.get("named_shape") == shape and h
                                               for v, h in zip(verdicts, here))
        rates["both_new_position"] = _share(_well_formed(v) and v.get("named_shape") == shape and v["fill"] == fill and h
                                            for v, h in zip(verdicts, here))
    rates["malformed"] = _share(v.get("verdict") == "malformed" for v in verdicts)
    rates["empty"] = _share(v.get("verdict") == "empty" for v in verdicts)
    rates["samples"] = len(verdicts)
    return rates


@torch.no_grad()
def content_and_style(model, adapters: tuple, shape: str, fill: str, triggers: str, n_seeds: int, seed: int) -> dict:
    """With ``adapters`` applied, samples of "<triggers> a <colour> <shape> in the center, gray background" in every
    base colour × ``n_seeds`` seeds: the shares the judge reads as ``shape`` (content), as ``fill`` (style), and as
    both in one image — old and new judge side by side (:func:`content_style_rates`)."""
    prompts, seeds = [], []
    for c_index, color in enumerate(COLORS):
        for i in range(n_seeds):
            prompts.append(f"{triggers} a {color} {shape} {CONTENT_STYLE_POSITION}, gray background")
            seeds.append(seed * 1000 + c_index * 50 + i)
    with adapters_applied(model, adapters):
        verdicts = judge_images(sample(model.pipe, prompts, seeds))
    return content_style_rates(verdicts, shape, fill, CONTENT_STYLE_POSITION)
