"""Material for an eye-labelled check set of the micro-world judge (issue 27, item 3).

    python bench/judge_check_set.py [--out bench/results/judge_check_set] [--seed 27] [--train-steps 150] [--no-b4m]

Objects are cut from real generations of the models (never from the scene generator): the base model on one- and
two-object base-set prompts and on novel shapes/fills it never learned, the shipped heart and ring concept LoRAs at
strength 1.0 and 0.6, the README's LoRA-Composer example (seeds 0-19), and a SaRA adapter, a plain LoRA and
(optionally) a Break-for-Make content adapter quickly trained on the novel star. So the set holds well-formed,
malformed, confused and empty regions from several sources.

A human labels every object by eye afterwards from the contact sheets, so the sheets carry nothing but the crop and
its id: no prompt, no source, no judge verdict. The object order is shuffled (fixed seed) before ids are given, so
neighbouring tiles do not reveal their source. Writes ``objects/NNNN.png`` (native-pixel crops), ``images/`` (the
full generations), ``manifest.json`` and ``sheet_NN.png`` (8×5 tiles each) to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from microworld.scenes import (COLORS, NOVEL_FILLS, NOVEL_SHAPES, POSITIONS, SceneConfig,  # noqa: E402
                               generate_scene, parse_caption, position_of)

CONCEPT_DIR = REPO / "assets" / "concepts"
STAR_TRIGGER = "sks"
MAX_FOUND_PER_IMAGE = 3  # multi-object images: the largest blobs only (specks and noise add no labelling value)
MAX_OBJECTS = 420
TRAIN_TIMEOUT = 240  # seconds; the brief's cap per training run

# The README's example composition ("Compose" section), LoRA paths relative to the repository.
README_COMPOSITION = {
    "prompt": "gray background", "negative_prompt": "",
    "width": 128, "height": 64, "steps": 20, "guidance": 4.0, "seed": 7,
    "concepts": [
        {"lora": "assets/concepts/ring.safetensors", "box": [0.02, 0.05, 0.48, 0.95],
         "prompt": "qwe a blue ring in the center, gray background", "strength": 1.3},
        {"lora": "assets/concepts/heart.safetensors", "box": [0.52, 0.05, 0.98, 0.95],
         "prompt": "zwx a red heart in the center, gray background", "strength": 0.8}],
    "mechanisms": {"injection": True, "isolation": True, "reinit": True, "latent_optimisation": "auto",
                   "global_ratio": 0.0},
}
COMPOSER_SEEDS = list(range(20))

# Sheet layout: 8 columns × 5 rows of 112-px crops, each over a label strip with its id.
SHEET_COLS, SHEET_ROWS = 8, 5
TILE = 112
LABEL_H = 30
GAP = 6
TILE_GREY = (118, 118, 118)  # neutral mid-grey, a shade off the micro world's gray background so crop edges show
SHEET_BG = (60, 60, 60)
LABEL_BG = (255, 255, 255)
LABEL_FG = (0, 0, 0)


@dataclass
class Generation:
    """One generated image and what its prompt asked for (labels only where the prompt names them)."""

    source: str
    prompt: str
    seed: int
    image: Image.Image
    kind: str  # "single" (one object asked), "multi" (several found objects cut) or "composer"
    asked: list[dict] = field(default_factory=list)  # objects the prompt names: shape, color, fill, position
    strength: float | None = None
    regions: list[dict] = field(default_factory=list)  # composer: intended boxes with their concept's labels
    file: str = ""


@dataclass
class Cut:
    """One object region of a generation, to be labelled by eye."""

    generation: Generation
    box: tuple[float, float, float, float]  # normalised in the full image
    cut: str  # "found" (find_objects blob, padded), "whole" (nothing found: empty candidate), "intended_box"
    intended: dict | None
    strength: float | None = None  # the adapter strength behind this region (composer: its concept's)


# ---------------------------------------------------------------------------------------------- prompts


def asked_objects(prompt: str) -> list[dict]:
    """Shape/colour/fill/position named by a prompt of the caption grammar (trigger words are skipped)."""
    objects, background = parse_caption(prompt)
    return [{**o, "background": background} for o in objects]


def base_single_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """One-object base-set captions with a sampling seed each (as ``microworld.evaluation.base_prompts``)."""
    from microworld.evaluation import base_prompts  # deferred: imports torch and the generation pipeline

    return [(p["prompt"], p["seed"]) for p in base_prompts(n, seed)]


def base_pair_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """Two-object base-set captions: every found object of these is cut."""
    return [(generate_scene([seed, 2, i], SceneConfig(min_objects=2, max_objects=2)).caption,
             seed * 1000 + 100 + i) for i in range(n)]


def novel_prompts(n_shapes: int, n_fills: int, seed: int) -> list[tuple[str, int]]:
    """Captions naming what the base model never learned: novel shapes (any fill) and novel fills on base shapes."""
    out = []
    for i in range(n_shapes):  # the four novel shapes in turn, other attributes random
        config = SceneConfig(shapes=(NOVEL_SHAPES[i % len(NOVEL_SHAPES)],), max_objects=1)
        out.append((generate_scene([seed, 3, i], config).caption, seed * 1000 + 200 + i))
    for i in range(n_fills):
        config = SceneConfig(fills=(NOVEL_FILLS[i % len(NOVEL_FILLS)],), max_objects=1)
        out.append((generate_scene([seed, 4, i], config).caption, seed * 1000 + 300 + i))
    return out


def concept_prompts(trigger: str, shape: str, n: int, seed: int, offset: int) -> list[tuple[str, int]]:
    """Trigger prompts for a concept: colours in turn, mostly centred on gray (the concepts' training setting), with
    some other positions and backgrounds so the set is not all alike."""
    rng = np.random.default_rng([seed, offset])
    colours = list(COLORS)
    out = []
    for i in range(n):
        position = "in the center" if i % 3 != 2 else str(rng.choice(POSITIONS))
        background = "gray" if i % 4 != 3 else str(rng.choice(["black", "white"]))
        out.append((f"{trigger} a {colours[i % len(colours)]} {shape} {position}, {background} background",
                    seed * 1000 + offset + i))
    return out


# ---------------------------------------------------------------------------------------------- training


def train_star_adapters(work: Path, steps: int, with_b4m: bool) -> dict[str, dict]:
    """Quick star adapters through the CLI in a subprocess each (one heavy process at a time); returns per method the
    file (or None when it failed) and its wall time. Each run is cut off after TRAIN_TIMEOUT seconds."""
    from microworld.evaluation import novel_shape_set  # deferred: imports torch

    data = novel_shape_set(work / "star_data", "star", 24)
    runs = {"sara": ["train", "sara"],  # SaRA's own default learning rate
            "lora": ["train", "lora", "--rank", "8", "--lr", "2e-3"]}
    if with_b4m:
        runs["b4m_content"] = ["train", "b4m-content", "--aux-microworld", "16", "--lr", "2e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for name, args in runs.items():
        target = work / f"star_{name}.safetensors"
        command = [sys.executable, str(REPO / "launch.py"), *args, "--data", str(data), "--out", str(target),
                   "--steps", str(steps), "--batch-size", "4", "--trigger", STAR_TRIGGER, "--seed", "0",
                   "--run-dir", str(work / f"run_{name}")]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT)
            ok = done.returncode == 0 and target.is_file()
            tail = (done.stdout + done.stderr).strip().splitlines()[-2:]
        except subprocess.TimeoutExpired:
            ok, tail = False, [f"timed out after {TRAIN_TIMEOUT} s"]
        seconds = time.perf_counter() - started
        out[name] = {"file": str(target) if ok else None, "seconds": round(seconds, 1), "steps": steps,
                     "command": " ".join(command[1:]), "log_tail": tail}
        print(f"trained {name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s — {' | '.join(tail)}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- generation


def generate(model, source: str, items: list[tuple[str, int]], kind: str, adapters: tuple = (),
             strength: float | None = None) -> list[Generation]:
    """Images of ``items`` (prompt, seed) at 64 px with ``adapters`` applied for the whole batch."""
    from microworld.evaluation import sample  # deferred (torch, diffusers), as all heavy imports here
    from pipelines.generation import adapters_applied

    with adapters_applied(model, adapters) as warnings:
        for warning in warnings:
            print(f"  warning ({source}): {warning}", flush=True)
        images = sample(model.pipe, [p for p, _ in items], [s for _, s in items])
    return [Generation(source, prompt, seed, image, kind, asked_objects(prompt), strength)
            for (prompt, seed), image in zip(items, images)]


def composer_generations(model, seeds: list[int]) -> list[Generation]:
    """The README's composition on each seed, run in-process the way ``cli/compose.py`` does."""
    from pipelines.composition import parse_composition  # deferred: the composer imports torch and diffusers
    from pipelines.lora_composer import compose

    spec = parse_composition(README_COMPOSITION, base=REPO)
    scheduler = model.pipe.scheduler  # compose() installs the spec's scheduler; put the pipeline's back afterwards
    regions = []
    for concept in README_COMPOSITION["concepts"]:
        asked = asked_objects(concept["prompt"])[0]
        regions.append({"box": tuple(concept["box"]), "shape": asked["shape"], "color": asked["color"],
                        "fill": asked["fill"], "strength": concept["strength"],
                        "lora": Path(concept["lora"]).name})
    for region, side in zip(regions, ("left box", "right box")):
        region["position"] = side
    out = []
    try:
        for seed in seeds:
            result = compose(model, replace(spec, seed=seed))
            for warning in result.warnings:
                print(f"  warning (composer seed {seed}): {warning}", flush=True)
            prompt = " | ".join([spec.prompt] + [c["prompt"] for c in README_COMPOSITION["concepts"]])
            asked = [{**r, "background": "gray"} for r in regions]  # the global prompt names only the background
            out.append(Generation("composer", prompt, seed, result.image.convert("RGB"), "composer", asked,
                                  regions=regions))
    finally:
        model.pipe.scheduler = scheduler
    return out


# ---------------------------------------------------------------------------------------------- cutting


def _centre_in(box: tuple[float, ...], region: tuple[float, ...]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def _label(obj: dict) -> dict:
    return {k: obj.get(k) for k in ("shape", "color", "fill", "position")}


def cuts_of(gen: Generation) -> list[Cut]:
    """The regions of one generation a human should label (see the module docstring)."""
    from microworld.judge import find_objects, pad_box  # deferred: imports torch

    found = [pad_box(b) for b in find_objects(gen.image)]
    if gen.kind == "single":
        intended = _label(gen.asked[0]) if gen.asked else None
        if not found:
            return [Cut(gen, (0.0, 0.0, 1.0, 1.0), "whole", intended, gen.strength)]
        return [Cut(gen, found[0], "found", intended, gen.strength)]
    cuts = []
    for box in found[:MAX_FOUND_PER_IMAGE]:
        intended, strength = None, gen.strength
        if gen.kind == "composer":
            inside = [r for r in gen.regions if _centre_in(box, r["box"])]
            intended = _label(inside[0]) if len(inside) == 1 else None
            strength = inside[0]["strength"] if len(inside) == 1 else None
        else:  # the named object whose position is the blob's 3×3 cell, if exactly one
            where = position_of((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            match = [o for o in gen.asked if o.get("position") == where]
            intended = _label(match[0]) if len(match) == 1 else None
        cuts.append(Cut(gen, box, "found", intended, strength))
    if gen.kind == "composer":
        cuts += [Cut(gen, tuple(r["box"]), "intended_box", _label(r), r["strength"]) for r in gen.regions]
    elif not found:
        cuts.append(Cut(gen, (0.0, 0.0, 1.0, 1.0), "whole", None, gen.strength))
    return cuts


def trim(cuts: list[Cut], limit: int, rng: np.random.Generator) -> list[Cut]:
    """At most ``limit`` cuts: drop found blobs of multi-object images first (the intended and one-object cuts are
    the set's backbone), chosen at random."""
    if len(cuts) <= limit:
        return cuts
    spare = [i for i, c in enumerate(cuts) if c.generation.kind != "single" and c.cut == "found"]
    drop = set(rng.choice(spare, size=min(len(spare), len(cuts) - limit), replace=False).tolist())
    return [c for i, c in enumerate(cuts) if i not in drop][:limit]


WINDOWS = 24  # extra regions cut at random places (often a part of an object: not a shape)
CORNERS = 16  # and image corners (usually background: the empty regions a judge must not name)
WINDOW_SIDE = 0.3  # of the image side
CORNER_SIDE = 0.22


def window_entries(images: list[tuple[str, Image.Image]], n: int, seed: int, first_id: int) -> list[dict]:
    """``n`` square windows at random places, then :data:`CORNERS` image corners, of randomly chosen generations (``images``: (file, image), any order;
    sorted here so the same files give the same windows): regions a judge may be asked about that often hold no
    object at all, or only a part of one."""
    rng = np.random.default_rng([seed, 28])
    images = sorted(images, key=lambda item: item[0])
    entries = []
    for k in range(n):
        file, image = images[int(rng.integers(len(images)))]
        x0, y0 = (float(v) for v in rng.uniform(0.0, 1.0 - WINDOW_SIDE, 2))
        entries.append({"id": first_id + k, "file": f"objects/{first_id + k:04d}.png", "source": "window",
                        "image": file, "image_size": list(image.size),
                        "box": [round(x0, 4), round(y0, 4), round(x0 + WINDOW_SIDE, 4), round(y0 + WINDOW_SIDE, 4)],
                        "cut": "window", "intended": None})
    for k in range(CORNERS):
        file, image = images[int(rng.integers(len(images)))]
        x0, y0 = (0.0 if int(v) == 0 else 1.0 - CORNER_SIDE for v in rng.integers(0, 2, 2))
        entries.append({"id": first_id + n + k, "file": f"objects/{first_id + n + k:04d}.png", "source": "corner",
                        "image": file, "image_size": list(image.size),
                        "box": [round(x0, 4), round(y0, 4), round(x0 + CORNER_SIDE, 4), round(y0 + CORNER_SIDE, 4)],
                        "cut": "corner", "intended": None})
    return entries


# ---------------------------------------------------------------------------------------------- sheets


def label_font(size: int) -> ImageFont.ImageFont:
    """A scalable font for the id labels (Pillow >= 10.1 has a sized default), else the bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def tile_of(crop: Image.Image) -> Image.Image:
    """The crop scaled with NEAREST (pixels stay visible) to fit TILE×TILE, aspect kept, centred on mid-grey."""
    w, h = crop.size
    scale = TILE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    tile = Image.new("RGB", (TILE, TILE), TILE_GREY)
    tile.paste(crop.resize(size, Image.NEAREST), ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
    return tile


def contact_sheets(crops: list[tuple[int, Image.Image]], out: Path, name: str = "{:04d}",
                   prefix: str = "sheet") -> list[Path]:
    """Sheets of SHEET_COLS×SHEET_ROWS tiles, each with only its id (``name`` formats it) in a label strip
    underneath."""
    font = label_font(24)
    per = SHEET_COLS * SHEET_ROWS
    cell_w, cell_h = TILE + GAP, TILE + LABEL_H + GAP
    paths = []
    for sheet_index, start in enumerate(range(0, len(crops), per)):
        sheet = Image.new("RGB", (SHEET_COLS * cell_w + GAP, SHEET_ROWS * cell_h + GAP), SHEET_BG)
        draw = ImageDraw.Draw(sheet)
        for slot, (object_id, crop) in enumerate(crops[start:start + per]):
            x = GAP + (slot % SHEET_COLS) * cell_w
            y = GAP + (slot // SHEET_COLS) * cell_h
            sheet.paste(tile_of(crop), (x, y))
            draw.rectangle((x, y + TILE, x + TILE - 1, y + TILE + LABEL_H - 1), fill=LABEL_BG)
            draw.text((x + TILE // 2, y + TILE + LABEL_H // 2), name.format(object_id), fill=LABEL_FG, font=font,
                      anchor="mm")
        path = out / f"{prefix}_{sheet_index:02d}.png"
        sheet.save(path)
        paths.append(path)
    return paths


def second_pass_sheets(folder: Path, seed: int) -> list[Path]:
    """Sheets for a second, blind labelling of the same objects: a new shuffle (``random.Random(seed)`` over the
    manifest's ids) under new names ``B000``…, so neither the first pass's ids and neighbours nor its labels are in
    view. ``second_pass/order.json`` maps each name back to its object id."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["objects"]
    ids = [item["id"] for item in manifest]
    random.Random(seed).shuffle(ids)
    files = {item["id"]: item["file"] for item in manifest}
    out = folder / "second_pass"
    out.mkdir(exist_ok=True)
    (out / "order.json").write_text(json.dumps({"seed": seed, "order": {f"B{i:03d}": k for i, k in enumerate(ids)}},
                                               indent=1) + "\n", encoding="utf-8")
    crops = [(i, Image.open(folder / files[k]).convert("RGB")) for i, k in enumerate(ids)]
    return contact_sheets(crops, out, name="B{:03d}")


# ---------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "judge_check_set"))
    parser.add_argument("--seed", type=int, default=27, help="seed of every prompt list and sampling seed")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of each quick star adapter")
    parser.add_argument("--no-b4m", action="store_true", help="skip the optional Break-for-Make content run")
    parser.add_argument("--keep-work", action="store_true", help="keep the trained adapters and their runs")
    parser.add_argument("--second-pass-sheets", type=int, metavar="SEED",
                        help="generate nothing: sheets of the existing set in a new order for a blind second labelling")
    args = parser.parse_args()
    if args.second_pass_sheets is not None:
        print(*second_pass_sheets(Path(args.out), args.second_pass_sheets), sep="\n")
        return 0
    started = time.perf_counter()

    # heavy imports (torch, diffusers, the models) only once the arguments are good
    import torch

    from microworld.judge import crop
    from models.loading import load_model
    from core.safetensors_files import read_metadata

    torch.set_num_threads(1)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "objects").mkdir(parents=True)
    (out / "images").mkdir()
    work = out / "_work"
    work.mkdir()

    trained = train_star_adapters(work, args.train_steps, with_b4m=not args.no_b4m)

    model = load_model(None)
    seed = args.seed
    gens: list[Generation] = []
    gens += generate(model, "base_single", base_single_prompts(60, seed), "single")
    gens += generate(model, "base_pair", base_pair_prompts(30, seed), "multi")
    gens += generate(model, "base_novel", novel_prompts(28, 12, seed), "single")
    print(f"base model done: {len(gens)} images, {time.perf_counter() - started:.0f} s", flush=True)
    for offset, shape in ((400, "heart"), (500, "ring")):
        path = CONCEPT_DIR / f"{shape}.safetensors"
        trigger = read_metadata(path)["atelier.trigger_words"].split(",")[0].strip()
        items = concept_prompts(trigger, shape, 25, seed, offset)
        for strength, part in ((1.0, items[:13]), (0.6, items[13:])):
            gens += generate(model, f"{shape}_lora", part, "single", ((str(path), strength),), strength)
    for offset, name in ((600, "sara"), (700, "lora"), (800, "b4m_content")):
        if name in trained and trained[name]["file"]:
            items = concept_prompts(STAR_TRIGGER, "star", 20, seed, offset)
            gens += generate(model, f"star_{name}", items, "single", ((trained[name]["file"], 1.0),), 1.0)
    print(f"adapters done: {len(gens)} images, {time.perf_counter() - started:.0f} s", flush=True)
    gens += composer_generations(model, COMPOSER_SEEDS)
    print(f"composer done: {len(gens)} images, {time.perf_counter() - started:.0f} s", flush=True)

    counters: dict[str, int] = {}
    for gen in gens:
        index = counters[gen.source] = counters.get(gen.source, -1) + 1
        gen.file = f"images/{gen.source}_{index:03d}_seed{gen.seed}.png"
        gen.image.save(out / gen.file)

    rng = np.random.default_rng([seed, 27])
    cuts = trim([c for gen in gens for c in cuts_of(gen)], MAX_OBJECTS, rng)
    order = rng.permutation(len(cuts))  # ids in shuffled order: a tile's neighbours do not give its source away
    manifest, crops = [], []
    for object_id, index in enumerate(order):
        c = cuts[index]
        g = c.generation
        region = crop(g.image, c.box)
        region.save(out / "objects" / f"{object_id:04d}.png")
        crops.append((object_id, region))
        manifest.append({
            "id": object_id, "file": f"objects/{object_id:04d}.png", "source": g.source, "prompt": g.prompt,
            "seed": g.seed, "strength": c.strength, "image": g.file, "image_size": list(g.image.size),
            "box": [round(v, 4) for v in c.box], "crop_pixels": list(region.size), "cut": c.cut,
            "intended": c.intended, "prompt_objects": [_label(o) for o in g.asked],
            "background": g.asked[0].get("background") if g.asked else None,
        })
    for entry in window_entries([(g.file, g.image) for g in gens], WINDOWS, seed, len(manifest)):
        region = crop(Image.open(out / entry["image"]).convert("RGB"), entry["box"])
        region.save(out / entry["file"])
        entry["crop_pixels"] = list(region.size)
        crops.append((entry["id"], region))
        manifest.append(entry)
    sheets = contact_sheets(crops, out)

    if not args.keep_work:
        shutil.rmtree(work)
    for info in trained.values():
        info["file"] = Path(info["file"]).name if info["file"] else None
    by_source: dict[str, dict[str, int]] = {}
    for gen in gens:
        by_source.setdefault(gen.source, {"images": 0, "objects": 0})["images"] += 1
    for entry in manifest:
        by_source.setdefault(entry["source"], {"images": 0, "objects": 0})["objects"] += 1
    seconds = time.perf_counter() - started
    (out / "manifest.json").write_text(json.dumps({
        "about": "objects cut from real micro-model generations for an eye-labelled check of the judge (issue 27, "
                 "item 3); unlabelled. cut: found = find_objects blob padded with pad_box, whole = nothing found "
                 "(empty candidate), intended_box = a composer concept's box, window = a random square region, corner = an image corner. intended: what the prompt asked at "
                 "that place, where the prompt names it. box: normalised x0, y0, x1, y1 in the full image.",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "seed": seed, "sampling": {
            "steps": 20, "guidance": 4.0, "size": 64, "composer": README_COMPOSITION},
        "trained_adapters": trained, "counts": by_source, "total_objects": len(manifest),
        "sheets": [p.name for p in sheets], "seconds": round(seconds, 1), "objects": manifest}, indent=1) + "\n",
        encoding="utf-8")

    print(f"\n{'source':<18}{'images':>8}{'objects':>9}")
    for source, n in by_source.items():
        print(f"{source:<18}{n['images']:>8}{n['objects']:>9}")
    cut_counts = {k: sum(e["cut"] == k for e in manifest) for k in ("found", "whole", "intended_box", "window", "corner")}
    print(f"{'total':<18}{len(gens):>8}{len(manifest):>9}   cuts: {cut_counts}")
    print(f"{len(sheets)} sheets in {out}; wall time {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
