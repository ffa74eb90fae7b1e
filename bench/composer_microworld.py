"""LoRA-Composer benchmark in the micro world: concept vanishing and confusion per box against the spec's three
baselines and the ablations, and the cost of N concepts against plain generation with one merged LoRA.

    OMP_NUM_THREADS=1 python bench/composer_microworld.py [--quick] [--seeds 50] [--layouts left/right,...]
                                                          [--methods composer,...] [--ablations-on left/right,...]
                                                          [--cost-reps 5] [--no-cost]

Quality (spec §7). Layouts: left/right (128×64), top/bottom (64×128), three side-by-side boxes (192×64); each box is
about a 64-px square, the size the micro model draws one object at. Their global prompt names every concept with its
colour and position, and every LoRA is at strength 1.0. A fourth layout, ``left/right (tab defaults)``, is the Compose
tab's opening example and the effect test's setting: global prompt ``gray background``, ring 1.3 / heart 0.8 (also
for the baselines); its table is ``composer_microworld_tab.md``::

    python bench/composer_microworld.py --layouts "left/right (tab defaults)" \
        --ablations-on "left/right (tab defaults)" --no-cost --out bench/results/composer_microworld_tab \
        --methods composer,no_isolation,no_reinit,merged,attention_mode,latent_mode

and the same layout on other seeds, to check that strengths chosen on seeds 0-49 hold (``--first-seed 100 --methods
composer,merged --out bench/results/composer_microworld_tab_seeds100``).

Concepts are the shipped attn2-only concept LoRAs (``assets/concepts``), each with its own colour. Methods, all on
the same seeds (the same initial noise):

- ``composer``: LoRA-Composer with its defaults (injection, isolation, re-initialisation; latent optimisation is off
  by default on the CPU);
- ablations ``no_isolation``, ``no_reinit``, ``optimisation`` (latent optimisation switched on);
- ``merged`` (baseline a): every LoRA applied to the whole model (diffusers' loader) and one prompt naming each
  concept with its trigger, colour and position;
- ``attention_mode`` (baseline b): regional prompting with the LoRAs global — every LoRA applied to the whole model,
  our pipeline run with LoRA-free concepts that carry only the region prompts, isolation and re-initialisation off;
- ``latent_mode`` (baseline c): per denoising step one UNet pass on the global prompt with no LoRA, and one pass per
  region with only that region's LoRA active and its region prompt (each with classifier-free guidance); inside the
  boxes the mean of the regions' outputs, elsewhere the global one (the loop is written here, on the pipeline's own
  scheduler; with no regions it is the pipeline's image, checked in every run).

Per box the micro-world judge reads the box crop: *vanishing* = the top-1 shape is not the box's concept;
*confusion* = the top-1 shape is another concept's shape, or the top-1 colour another concept's colour (where that
colour differs from the box's own). *All right* = share of seeds in which every box shows its concept's shape;
*clean* = all right and no confusion in any box. Those are the old judge's (the CNN's labels alone); the new judge
counts a box's shape only where the object in it is well formed (verdict ``ok``, see ``microworld/fidelity.py``):
``vanishing_new``, ``all_right_new``, ``clean_new``, ``malformed_boxes``; ``all_right_new_position`` also asks for
each object's centroid in the place the layout names for its box (within the whole image; the global and merged
prompts name it, except the tab defaults' global prompt).

Cost: one fixed 256×64 canvas with N = 1..4 side-by-side boxes (the shipped LoRAs reused in turn). Seconds per image
are measured side by side in this process (the configurations alternate, median over ``--cost-reps`` images each);
LoRA files are read and applied before the clock starts. Peak memory: every configuration in a fresh subprocess
(this script with ``--child``): model load, RSS recorded (VmRSS), adapters set up, one warm-up image, the kernel's RSS
high-water mark (VmHWM) reset, one image; peak = VmHWM after that image − the RSS after model load. On CUDA:
``torch.cuda.max_memory_allocated`` after a reset, minus the memory allocated after model load. The reference is
plain generation with one LoRA merged into the weights.

Writes bench/results/composer_microworld.{json,md} and composer_microworld.png (a few seeds × methods, left/right, box
overlays). ``--quick`` (3 seeds, 1 cost image, no memory subprocesses) writes under /tmp instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from process_memory import reset_rss_high_water, vm_status  # noqa: E402  (bench/, the script's folder)
from report import describe_machine, machine, new_judge_note  # noqa: E402

MODEL = REPO / "assets" / "micro-sd"
CONCEPT_DIR = REPO / "assets" / "concepts"
DEFAULT_OUT = REPO / "bench" / "results" / "composer_microworld"
QUICK_OUT = Path(tempfile.gettempdir()) / "atelier-bench" / "composer_microworld_quick"
CHILD_PREFIX = "COMPOSER_COST_RESULT "

STEPS, GUIDANCE = 20, 4.0
# shape → (trigger, colour); the trigger is the one bench/make_concept_loras.py trained the file with
SHAPES = {"ring": ("qwe", "blue"), "heart": ("zwx", "red"), "cross": ("vkc", "green")}
THIRD = "cross"  # the third concept, used where its file is shipped

METHODS = ("composer", "no_isolation", "no_reinit", "optimisation", "merged", "attention_mode", "latent_mode")
ABLATIONS = ("no_isolation", "no_reinit", "optimisation")
GRID_LABELS = {"composer": "LoRA-Composer", "no_isolation": "no isolation", "no_reinit": "no re-init",
               "optimisation": "+ latent optimisation", "merged": "(a) merged", "attention_mode": "(b) attention mode",
               "latent_mode": "(c) latent mode"}  # ASCII: PIL's default font has no minus sign
LABELS = {"composer": "LoRA-Composer", "no_isolation": "− isolation", "no_reinit": "− re-init",
          "optimisation": "+ latent optimisation", "merged": "(a) merged LoRAs, one prompt",
          "attention_mode": "(b) attention mode", "latent_mode": "(c) latent mode"}


# ----------------------------------------------------------------------------------------------------- layouts


def concept_file(shape: str) -> Path:
    return CONCEPT_DIR / f"{shape}.safetensors"


def region_prompt(shape: str, colour: str) -> str:
    return f"{SHAPES[shape][0]} a {colour} {shape} in the center, gray background"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_layout(name: str, width: int, height: int, regions: list[tuple[str, str, tuple, str]]) -> dict:
    """regions: (shape, colour, box, position phrase). The global prompt names colours, shapes and positions; the
    merged baseline's prompt is the same with each concept's trigger in front of its phrase."""
    plain = [f"a {colour} {shape} {where}" for shape, colour, _, where in regions]
    merged = [f"{SHAPES[shape][0]} a {colour} {shape} {where}" for shape, colour, _, where in regions]
    return {"name": name, "width": width, "height": height,
            "regions": [{"shape": s, "colour": c, "box": list(b), "prompt": region_prompt(s, c), "file": str(
                concept_file(s).relative_to(REPO)), "position": where or None} for s, c, b, where in regions],
            "global_prompt": _join(plain) + ", gray background",
            "merged_prompt": _join(merged) + ", gray background"}


def tab_layout(left: tuple, right: tuple) -> dict:
    """The Compose tab's defaults (and the effect test's setting): a global prompt naming only the background, the
    ring at 1.3 on the left and the heart at 0.8 on the right (the heart LoRA is the stronger one). The merged
    baseline applies the LoRAs at the same strengths."""
    layout = make_layout("left/right (tab defaults)", 128, 64, [("ring", "blue", left, "on the left"),
                                                                ("heart", "red", right, "on the right")])
    layout["regions"][0]["strength"], layout["regions"][1]["strength"] = 1.3, 0.8
    layout["global_prompt"] = "gray background"
    return layout


def layouts(third_shipped: bool) -> dict[str, dict]:
    left, right = (0.02, 0.05, 0.48, 0.95), (0.52, 0.05, 0.98, 0.95)
    top, bottom = (0.05, 0.02, 0.95, 0.48), (0.05, 0.52, 0.95, 0.98)
    thirds = [(0.01, 0.05, 0.32, 0.95), (0.345, 0.05, 0.655, 0.95), (0.68, 0.05, 0.99, 0.95)]
    return {
        "left/right (tab defaults)": tab_layout(left, right),
        "left/right": make_layout("left/right", 128, 64, [("ring", "blue", left, "on the left"),
                                                          ("heart", "red", right, "on the right")]),
        "top/bottom": make_layout("top/bottom", 64, 128, [("ring", "blue", top, "at the top"),
                                                          ("heart", "red", bottom, "at the bottom")]),
        # without a third concept LoRA: heart, ring and heart again (a repeated concept, in its own colour)
        "three boxes": make_layout("three boxes", 192, 64,
                                   [("ring", "blue", thirds[0], "on the left"),
                                    ("heart", "red", thirds[1], "in the center"),
                                    ("cross", "green", thirds[2], "on the right")] if third_shipped else
                                   [("heart", "red", thirds[0], "on the left"),
                                    ("ring", "blue", thirds[1], "in the center"),
                                    ("heart", "green", thirds[2], "on the right")]),
    }


def cost_layout(n: int, shapes: list[str]) -> dict:
    """N side-by-side boxes on one 256×64 canvas, the shipped concepts reused in turn."""
    colours = ("blue", "red", "green", "yellow")
    regions = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        regions.append((shape, colours[i], (i / 4 + 0.01, 0.05, (i + 1) / 4 - 0.01, 0.95), ""))
    layout = make_layout(f"cost N={n}", 256, 64, regions)
    layout["global_prompt"] = _join([f"a {c} {s}" for s, c, _, _ in regions]) + " in a row, gray background"
    return layout


# ----------------------------------------------------------------------------------------------------- methods


class Runner:
    """Every method on one loaded micro model; each returns one PIL image per seed."""

    def __init__(self, model) -> None:
        from pipelines.lora_composer import LoraComposerPipeline

        self.model = model
        self.pipe = model.pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.composer = LoraComposerPipeline(self.pipe)
        self.device = self.pipe._execution_device
        self.optimisation_logs: list[list[dict]] = []

    # --- concepts and adapters
    def concepts(self, layout: dict, with_lora: bool = True) -> list:
        from pipelines.composition import ConceptSpec
        from pipelines.lora_composer import Concept, load_concept

        out = []
        for region in layout["regions"]:
            spec = ConceptSpec(lora=str(REPO / region["file"]), box=tuple(region["box"]), prompt=region["prompt"],
                               strength=region.get("strength", 1.0))
            if with_lora:
                out.append(load_concept(spec, self.pipe, self.model.fingerprint))
            else:  # a pure regional prompt: no LoRA deltas, the base text encoder
                out.append(Concept(name=region["shape"], box=spec.box, prompt=spec.prompt, strength=spec.strength,
                                   negative_prompt="", trigger=SHAPES[region["shape"]][0], cross_deltas={},
                                   text_encoder=None))
        return out

    @staticmethod
    def distinct_files(layout: dict) -> list[str]:
        return list(dict.fromkeys(str(REPO / r["file"]) for r in layout["regions"]))

    @contextmanager
    def global_loras(self, layout: dict):
        from pipelines.generation import adapters_applied

        strengths = {str(REPO / r["file"]): r.get("strength", 1.0) for r in layout["regions"]}
        with adapters_applied(self.model, tuple((f, strengths[f]) for f in self.distinct_files(layout))):
            yield

    @contextmanager
    def region_loras(self, layout: dict):
        """Each distinct LoRA loaded under its own adapter name (for latent mode to switch between)."""
        from adapters.lora.files import load_lora
        from adapters.lora.apply import apply_loras, remove_loras

        files = self.distinct_files(layout)
        names = [f"region_{i}" for i in range(len(files))]
        apply_loras(self.pipe, [(load_lora(Path(f), self.pipe), 1.0) for f in files], names=names)
        by_file = dict(zip(files, names))
        try:
            yield [by_file[str(REPO / r["file"])] for r in layout["regions"]]
        finally:
            remove_loras(self.pipe)

    @contextmanager
    def merged_weights(self, file: str):
        """One LoRA merged into the base weights; the exact weights are written back afterwards."""
        from adapters.lora.files import load_lora
        from pipelines.lora_composer import lora_merged

        with lora_merged(self.pipe, load_lora(Path(file), self.pipe), 1.0):
            yield

    # --- generation
    def plain(self, prompt: str, seeds: list[int], width: int, height: int, chunk: int = 10) -> list:
        images = []
        for start in range(0, len(seeds), chunk):
            part = seeds[start:start + chunk]
            with torch.inference_mode():
                images += self.pipe([prompt] * len(part), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                    width=width, height=height,
                                    generator=[torch.Generator("cpu").manual_seed(s) for s in part]).images
        return images

    def compose(self, layout: dict, concepts: list, seeds: list[int], mechanisms) -> list:
        outputs = [self.composer(layout["global_prompt"], concepts, steps=STEPS, guidance=GUIDANCE, seed=s,
                                 width=layout["width"], height=layout["height"], mechanisms=mechanisms)
                   for s in seeds]
        self.optimisation_logs = [o.optimisation_log for o in outputs]
        return [o.image for o in outputs]

    def encode(self, prompt: str) -> torch.Tensor:
        positive, negative = self.pipe.encode_prompt(prompt, self.device, 1, True, negative_prompt=None)
        return torch.cat([negative, positive])

    @torch.no_grad()
    def latent_mode_image(self, global_embeds: torch.Tensor, regions: list[tuple[str, torch.Tensor, float]],
                          boxes: list, seed: int, width: int, height: int):
        """Latent-mode regional LoRA: the global pass without LoRAs, one pass per region with only its LoRA and
        its prompt; model outputs (after CFG) blended by the box masks, mean where boxes overlap."""
        from diffusers.utils.torch_utils import randn_tensor

        from pipelines.region_attention import box_masks

        pipe, unet = self.pipe, self.pipe.unet
        scale = int(pipe.vae_scale_factor)
        h, w = height // scale, width // scale
        generator = torch.Generator("cpu").manual_seed(int(seed))
        latents = randn_tensor((1, unet.config.in_channels, h, w), generator=generator, device=self.device,
                               dtype=unet.dtype)
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(STEPS, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        masks = box_masks(list(boxes), h, w, device=self.device).view(len(boxes), 1, 1, h, w).to(latents.dtype)
        cover = masks.sum(0)

        def predict(model_input, t, embeds):
            out = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            uncond, cond = out.chunk(2)
            return uncond + GUIDANCE * (cond - uncond)

        peft = bool(regions) and hasattr(unet, "peft_config")
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            if peft:
                unet.disable_lora()
            out = predict(model_input, t, global_embeds)
            if regions:
                if peft:
                    unet.enable_lora()
                region_out = []
                for name, embeds, strength in regions:
                    if peft:
                        unet.set_adapters([name], [strength])
                    region_out.append(predict(model_input, t, embeds))
                inside = (masks * torch.stack(region_out)).sum(0) / cover.clamp(min=1)
                out = torch.where(cover > 0, inside, out)
            latents = scheduler.step(out, t, latents, **extra, return_dict=False)[0]
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]

    def latent_mode(self, layout: dict, seeds: list[int]) -> list:
        global_embeds = self.encode(layout["global_prompt"])
        region_embeds = [self.encode(r["prompt"]) for r in layout["regions"]]
        boxes = [tuple(r["box"]) for r in layout["regions"]]
        with self.region_loras(layout) as names:
            strengths = [r.get("strength", 1.0) for r in layout["regions"]]
            return [self.latent_mode_image(global_embeds, list(zip(names, region_embeds, strengths)), boxes, s,
                                           layout["width"], layout["height"]) for s in seeds]

    def run(self, method: str, layout: dict, seeds: list[int]) -> list:
        from pipelines.composition import Mechanisms

        if method == "merged":
            with self.global_loras(layout):
                return self.plain(layout["merged_prompt"], seeds, layout["width"], layout["height"])
        if method == "attention_mode":
            concepts = self.concepts(layout, with_lora=False)
            with self.global_loras(layout):
                return self.compose(layout, concepts, seeds, Mechanisms(isolation=False, reinit=False))
        if method == "latent_mode":
            return self.latent_mode(layout, seeds)
        mechanisms = {"composer": Mechanisms(), "no_isolation": Mechanisms(isolation=False),
                      "no_reinit": Mechanisms(reinit=False),
                      "optimisation": Mechanisms(latent_optimisation=True)}[method]
        return self.compose(layout, self.concepts(layout), seeds, mechanisms)

    def latent_mode_check(self, seed: int = 0) -> dict:
        """With no regions the latent-mode loop must give the pipeline's own image (same seed, same prompt)."""
        import numpy as np

        prompt = "a red circle in the center, gray background"
        ours = self.latent_mode_image(self.encode(prompt), [], [], seed, 64, 64)
        theirs = self.plain(prompt, [seed], 64, 64)[0]
        diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
        return {"max_abs_pixel_difference": int(diff.max()), "mean_abs_pixel_difference": round(float(diff.mean()), 4)}


# ----------------------------------------------------------------------------------------------------- judging


def judge_layout(images: list, layout: dict) -> list[list[dict]]:
    """Per seed, per box: the judge's top-1 shape and colour of the box crop, blobs found, and the verdicts — the old
    judge's (``vanished``, ``confused``) and the new one's (``verdict``, ``fidelity``, ``position`` of the object in
    the whole image; ``vanished_new``: not a well-formed object of the box's shape; ``misplaced``: not in the place
    the layout names for the box)."""
    from microworld.judge import judge_images

    regions = layout["regions"]
    per_box = [judge_images(images, [tuple(r["box"])] * len(images)) for r in regions]
    out = []
    for i in range(len(images)):
        row = []
        for b, region in enumerate(regions):
            v = per_box[b][i]
            others = [r for r in regions if r["shape"] != region["shape"]]
            other_shape = any(v["shape"] == r["shape"] for r in others)
            other_colour = any(v["color"] == r["colour"] and r["colour"] != region["colour"]
                               for r in regions if r is not region)
            where = region.get("position")
            row.append({"shape": v["shape"], "color": v["color"], "shape_prob": v["shape_prob"],
                        "objects_found": v["objects_found"], "vanished": v["shape"] != region["shape"],
                        "confused": bool(other_shape or other_colour),
                        "verdict": v["verdict"], "fidelity": v["fidelity"], "position": v["position"],
                        "vanished_new": not (v["verdict"] == "ok" and v["named_shape"] == region["shape"]),
                        "misplaced": bool(where) and v["position"] != where})
        out.append(row)
    return out


def summarise(verdicts: list[list[dict]]) -> dict:
    boxes = [b for row in verdicts for b in row]
    n_boxes, n_seeds = len(boxes), len(verdicts)
    all_right = [all(not b["vanished"] for b in row) for row in verdicts]
    clean = [all(not b["vanished"] and not b["confused"] for b in row) for row in verdicts]
    all_right_new = [all(not b["vanished_new"] for b in row) for row in verdicts]
    clean_new = [all(not b["vanished_new"] and not b["confused"] for b in row) for row in verdicts]
    placed_new = [all(not b["vanished_new"] and not b["misplaced"] for b in row) for row in verdicts]
    return {"seeds": n_seeds, "boxes": n_boxes,
            "vanishing": sum(b["vanished"] for b in boxes) / n_boxes,
            "confusion": sum(b["confused"] for b in boxes) / n_boxes,
            "all_right": sum(all_right) / n_seeds, "clean": sum(clean) / n_seeds,
            "empty_boxes": sum(b["objects_found"] == 0 for b in boxes) / n_boxes,
            "vanishing_new": sum(b["vanished_new"] for b in boxes) / n_boxes,
            "all_right_new": sum(all_right_new) / n_seeds, "clean_new": sum(clean_new) / n_seeds,
            "all_right_new_position": sum(placed_new) / n_seeds,
            "malformed_boxes": sum(b["verdict"] == "malformed" for b in boxes) / n_boxes,
            "all_right_seeds": all_right, "all_right_new_seeds": all_right_new,
            "per_box_vanishing": [sum(row[i]["vanished"] for row in verdicts) / n_seeds
                                  for i in range(len(verdicts[0]))],
            "per_box_vanishing_new": [sum(row[i]["vanished_new"] for row in verdicts) / n_seeds
                                      for i in range(len(verdicts[0]))],
            "per_box_confusion": [sum(row[i]["confused"] for row in verdicts) / n_seeds
                                  for i in range(len(verdicts[0]))]}


def paired(a: list[bool], b: list[bool]) -> dict:
    """Seeds where only a / only b gets every box right, and the exact two-sided sign-test p of that split."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_composer": only_a, "only_other": only_b, "p": float(p)}


# ----------------------------------------------------------------------------------------------------- cost


MEMORY_METHOD = ("Each configuration in a fresh process: VmRSS after model load, adapters set up, one warm-up image, "
                 "the RSS high-water mark (VmHWM) reset, one image; peak above model = VmHWM after that image − the "
                 "RSS after model load (on CUDA: max_memory_allocated after a reset − memory allocated after load).")


def cost_configs(shapes: list[str]) -> list[tuple[str, int]]:
    return [("merged_one", 1)] + [(m, n) for m in ("composer", "latent_mode") for n in (1, 2, 3, 4)]


@contextmanager
def cost_setup(runner: Runner, method: str, layout: dict):
    """Everything a configuration needs before its images: LoRAs read and applied, concepts loaded, prompts encoded.
    Yields a function that makes one image of a seed."""
    if method == "merged_one":
        region = layout["regions"][0]
        with runner.merged_weights(str(REPO / region["file"])):
            prompt = f"{SHAPES[region['shape']][0]} a {region['colour']} {region['shape']} in the center, " \
                     "gray background"
            yield lambda seed: runner.plain(prompt, [seed], layout["width"], layout["height"])[0]
    elif method == "composer":
        from pipelines.composition import Mechanisms

        concepts = runner.concepts(layout)
        yield lambda seed: runner.compose(layout, concepts, [seed], Mechanisms())[0]
    elif method == "latent_mode":
        global_embeds = runner.encode(layout["global_prompt"])
        region_embeds = [runner.encode(r["prompt"]) for r in layout["regions"]]
        boxes = [tuple(r["box"]) for r in layout["regions"]]
        strengths = [r.get("strength", 1.0) for r in layout["regions"]]
        with runner.region_loras(layout) as names:
            regions = list(zip(names, region_embeds, strengths))
            yield lambda seed: runner.latent_mode_image(global_embeds, regions, boxes, seed, layout["width"],
                                                        layout["height"])
    else:
        raise ValueError(method)


def cost_times(runner: Runner, shapes: list[str], reps: int) -> dict:
    """Seconds per image, configurations alternating image by image, median over ``reps`` images each."""
    configs = cost_configs(shapes)
    times: dict[str, list[float]] = {f"{m}:{n}": [] for m, n in configs}
    for rep in range(reps + 1):  # rep 0 warms every configuration up and is not counted
        for method, n in configs:
            with cost_setup(runner, method, cost_layout(n, shapes)) as make:
                started = time.perf_counter()
                make(1000 + rep)
                elapsed = time.perf_counter() - started
            if rep:
                times[f"{method}:{n}"].append(elapsed)
    return {key: {"median_s": statistics.median(v), "all_s": [round(x, 3) for x in v]} for key, v in times.items()}


def child(method: str, n: int, shapes: list[str]) -> None:
    """One configuration's peak memory, in a fresh process; prints one JSON line."""
    from models.loading import load_model

    torch.set_num_threads(1)
    model = load_model(MODEL)
    runner = Runner(model)
    cuda = runner.device.type == "cuda"
    if cuda:  # pragma: no cover - no GPU here
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = vm_status("VmRSS")
    layout = cost_layout(n, shapes)
    with cost_setup(runner, method, layout) as make:
        make(1000)  # warm-up
        if cuda:  # pragma: no cover
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            reset = True
        else:
            reset = reset_rss_high_water()
        make(1001)
        if cuda:  # pragma: no cover
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            result = {"peak_mib": peak / 2**20, "above_model_mib": (peak - base) / 2**20, "source": "cuda"}
        else:
            # VmHWM, not ru_maxrss: a child started from this (model-holding) process inherits the parent's peak
            # in ru_maxrss across exec, so ru_maxrss would report the parent's high-water mark
            peak = vm_status("VmHWM")
            result = {"peak_mib": peak / 1024, "above_model_mib": (peak - base) / 1024,
                      "model_rss_mib": base / 1024, "source": "VmHWM" + ("" if reset else " (no reset)")}
    print(CHILD_PREFIX + json.dumps({"method": method, "n": n, **result}), flush=True)


def cost_memory(shapes: list[str]) -> dict:
    out = {}
    for method, n in cost_configs(shapes):
        proc = subprocess.run([sys.executable, __file__, "--child", method, str(n), "--shapes", ",".join(shapes)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_PREFIX)]
        if proc.returncode or not lines:
            raise RuntimeError(f"memory child {method} {n} failed:\n{proc.stderr[-2000:]}")
        out[f"{method}:{n}"] = json.loads(lines[-1][len(CHILD_PREFIX):])
        print(f"memory {method} N={n}: {out[f'{method}:{n}']['above_model_mib']:.1f} MiB above the model", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- picture


def grid(images: dict[str, list], layout: dict, seeds: list[int], path: Path, zoom: int = 2) -> None:
    from PIL import Image, ImageDraw

    from pipelines.lora_composer import box_overlay

    methods = list(images)
    boxes = [tuple(r["box"]) for r in layout["regions"]]
    w, h = layout["width"] * zoom, layout["height"] * zoom
    label_w, head_h, pad = 56, 16, 4
    sheet = Image.new("RGB", (label_w + len(methods) * (w + pad), head_h + len(seeds) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, method in enumerate(methods):
        x = label_w + c * (w + pad)
        draw.text((x + 2, 2), GRID_LABELS[method], fill="black")
        for r, seed in enumerate(seeds):
            y = head_h + r * (h + pad)
            big = images[method][r].resize((w, h), Image.NEAREST)
            sheet.paste(box_overlay(big, boxes), (x, y))
            if c == 0:
                draw.text((4, y + h // 2 - 6), f"seed {seed}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


# ----------------------------------------------------------------------------------------------------- report


VALID_MEMORY = ("VmHWM", "cuda")
INVALID_MEMORY_NOTE = ("Memory columns left out: this run's children read `ru_maxrss`, which on Linux keeps the "
                       "peak of the process they were started from (the benchmark itself, model loaded) across exec, so every "
                       "row showed the same parent peak. The script now reads VmHWM; the peak memory is measured in "
                       "composer_microworld_memory.md (`--memory-only`).")
COST_LABELS = {"merged_one": "one merged LoRA (reference)", "composer": "LoRA-Composer",
               "latent_mode": "(c) latent mode"}


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def pair_text(pair: dict | None) -> str:
    return "—" if pair is None else f"{pair['only_composer']} / {pair['only_other']} ({pair['p']:.2g})"


def table(result: dict) -> str:
    if "memory_only" in result:
        lines = [f"# LoRA-Composer peak memory in the micro world ({result['date']})", "",
                 f"Machine: {result['machine']}. Run time {result['total_minutes']:.1f} min. Reference: plain "
                 "generation with one LoRA merged into the weights; concepts: the shipped LoRAs "
                 f"({', '.join(result['shapes'])}) reused in turn; seconds per image are in "
                 "composer_microworld.md.", ""]
        return "\n".join(lines + _memory_lines(result["memory_only"]))
    lines = [f"# LoRA-Composer in the micro world ({result['date']})", "",
             f"Micro model, {STEPS} DDIM steps, guidance {GUIDANCE}, "
             f"seeds {result['seeds'][0]}–{result['seeds'][-1]} "
             f"({len(result['seeds'])}) for every method of a layout. Concepts: the shipped attn2-only LoRAs "
             f"({', '.join(f'{s} = `{SHAPES[s][0]}`' for s in result['shapes'])}). {result['third_note']}", "",
             f"Machine: {result['machine']}. Total run time {result['total_minutes']:.1f} min.", "",
             "Per box, the judge reads the box crop. Vanishing: the box's concept shape is not the top-1 shape. "
             "Confusion: the top-1 shape is another concept's, or the top-1 colour another concept's. All right: "
             "every box shows its concept's shape. Clean: all right and no confusion. Empty: the crop shows no "
             "object standing out from its border (the judge still names a shape). Each as read by the old judge "
             "and by the new one; malformed boxes: the new judge's verdict.", "",
             new_judge_note() + " Here a box's concept counts for the new judge when its crop holds a well-formed "
             "object of the concept's shape; with position: also its centroid (within the whole image) in the place "
             "the layout names for the box (named by the global prompt, except in the tab defaults, and by the "
             "merged baseline's prompt).", ""]
    for name, section in result["layouts"].items():
        layout = section["layout"]
        lines += [f"## {name} ({layout['width']}×{layout['height']})", "",
                  "Regions: " + "; ".join(f"`{r['prompt']}` in {tuple(r['box'])}"
                                          + (f" at strength {r.get('strength', 1.0)}" if any(
                                              "strength" in q for q in layout["regions"]) else "")
                                          for r in layout["regions"])
                  + f". Global prompt: `{layout['global_prompt']}`; merged baseline: `{layout['merged_prompt']}`.",
                  "", "| method | vanishing: old judge | new judge | confusion | all right: old judge | new judge "
                  "| new, with position | clean: old judge | new judge | empty boxes | malformed boxes "
                  "| all right: only composer / only this (sign-test p): old judge | new judge | s/image |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method, s in section["methods"].items():
            lines.append(f"| {LABELS[method]} | {pct(s['vanishing'])} | {pct(s.get('vanishing_new'))} | "
                         f"{pct(s['confusion'])} | {pct(s['all_right'])} | {pct(s.get('all_right_new'))} | "
                         f"{pct(s.get('all_right_new_position'))} | {pct(s['clean'])} | {pct(s.get('clean_new'))} | "
                         f"{pct(s['empty_boxes'])} | {pct(s.get('malformed_boxes'))} | "
                         f"{pair_text(s.get('vs_composer'))} | {pair_text(s.get('vs_composer_new'))} | "
                         f"{s['seconds_per_image']:.2f} |")
        per_box = ", ".join(f"{r['shape']}" for r in layout["regions"])
        lines += ["", f"Per box vanishing ({per_box}), old judge: " + "; ".join(
            f"{LABELS[m]} " + "/".join(pct(v) for v in s["per_box_vanishing"]) for m, s in section["methods"].items()),
            ""]
        if all("per_box_vanishing_new" in s for s in section["methods"].values()):
            lines += [f"Per box vanishing ({per_box}), new judge: " + "; ".join(
                f"{LABELS[m]} " + "/".join(pct(v) for v in s["per_box_vanishing_new"])
                for m, s in section["methods"].items()), ""]
        opt = section["methods"].get("optimisation", {}).get("optimisation")
        if opt:
            lines += [f"Latent optimisation: {opt['gradient_steps_mean']:.2f} gradient steps per image on average "
                      f"(at most {STEPS // 2}); stopped because the loss rose in {pct(opt['stopped_early'])} of the "
                      "images.", ""]
    check = result.get("latent_mode_check")
    if check:
        lines += [f"Latent-mode loop with no regions vs the pipeline's own image (same seed): max |Δpixel| "
                  f"{check['max_abs_pixel_difference']}, mean {check['mean_abs_pixel_difference']}.", ""]
    cost = result.get("cost")
    if cost:
        lines += [f"## Cost: N concepts on {cost['canvas']}", "",
                  f"Seconds: median of {cost['reps']} images per configuration, configurations alternating in one "
                  f"process. Memory: {cost['memory_method']}", "",
                  "| method | N | s/image | time ÷ one merged LoRA | peak MiB above model | memory ÷ one merged LoRA "
                  "| peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key, row in cost["rows"].items():
            mem = row.get("memory")
            if mem and mem.get("source") not in VALID_MEMORY:
                mem = None  # see memory_note
            lines.append(f"| {row['method']} | {row['n']} | {row['median_s']:.2f} | {row['time_ratio']:.2f} | "
                         + (f"{mem['above_model_mib']:.1f} | {row['memory_ratio']:.2f} | {mem['peak_mib']:.0f} |"
                            if mem else "— | — | — |"))
        lines.append("")
        if any(r.get("memory", {}).get("source") not in VALID_MEMORY for r in cost["rows"].values()
               if r.get("memory")):
            lines += [INVALID_MEMORY_NOTE, ""]
    return "\n".join(lines)


def _memory_lines(memory: dict) -> list[str]:
    lines = [f"## Peak memory: N concepts on {memory['canvas']}", "", memory["memory_method"], "",
             "| method | N | peak MiB above model | ÷ one merged LoRA | peak MiB (VmHWM) | RSS after model load MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in memory["rows"].values():
        lines.append(f"| {row['label']} | {row['n']} | {row['above_model_mib']:.1f} | {row['memory_ratio']:.2f} | "
                     f"{row['peak_mib']:.0f} | {row.get('model_rss_mib', 0):.0f} |")
    return lines + [""]


# ----------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 1 cost image, no memory subprocesses")
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST+SEEDS-1 (default 0)")
    parser.add_argument("--layouts", default="left/right,top/bottom,three boxes",
                        help='comma-separated; also "left/right (tab defaults)"')
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--ablations-on", default="left/right,top/bottom,three boxes",
                        help="layouts the ablations run on (the baselines run on every layout)")
    parser.add_argument("--cost-reps", type=int, default=5)
    parser.add_argument("--no-cost", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--grid-seeds", type=int, default=4)
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak-memory subprocesses; writes OUT_memory.{json,md}")
    parser.add_argument("--render", metavar="JSON", help="rewrite the .md of an existing result JSON (no measuring)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        child(args.child[0], int(args.child[1]), args.shapes.split(","))
        return 0
    if not (MODEL / "model_index.json").is_file():
        print("micro base model not shipped; nothing to measure", file=sys.stderr)
        return 1
    from report import write_report
    from models.loading import load_model

    if args.render:
        data = json.loads(Path(args.render).read_text(encoding="utf-8"))
        Path(args.render).with_suffix(".md").write_text(table(data), encoding="utf-8")
        return 0
    started = time.perf_counter()
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.memory_only:
        shapes = ["ring", "heart"] + ([THIRD] if concept_file(THIRD).is_file() else [])
        memory = cost_memory(shapes)
        ref = memory["merged_one:1"]["above_model_mib"]
        rows = {key: {"label": COST_LABELS[m["method"]], **m, "memory_ratio": m["above_model_mib"] / ref}
                for key, m in memory.items()}
        result = {"date": date.today().isoformat(), "machine": describe_machine(machine()), "seeds": [], "shapes": shapes,
                  "third_note": "", "layouts": {},
                  "memory_only": {"canvas": "256×64, N side-by-side boxes of 64 px", "rows": rows,
                                  "memory_method": MEMORY_METHOD}}
        result["total_minutes"] = (time.perf_counter() - started) / 60
        write_report(out.with_name(out.name + "_memory.json"), result, table(result))
        return 0
    n_seeds = 3 if args.quick else args.seeds
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    third_shipped = concept_file(THIRD).is_file()
    shapes = ["ring", "heart"] + ([THIRD] if third_shipped else [])
    all_layouts = layouts(third_shipped)
    wanted_methods = [m for m in args.methods.split(",") if m]
    ablation_layouts = set(args.ablations_on.split(","))
    model = load_model(MODEL)
    runner = Runner(model)
    result = {"date": date.today().isoformat(), "seeds": seeds, "steps": STEPS, "guidance": GUIDANCE,
              "shapes": shapes, "machine": describe_machine(machine()),
              "third_note": (f"Three boxes: ring, heart and {THIRD} (`{SHAPES[THIRD][0]}`)." if third_shipped else
                             "Three boxes: no third concept LoRA passed its check (bench/make_concept_loras.py), "
                             "so heart, ring and heart again (the repeated heart in green)."),
              "latent_mode_check": runner.latent_mode_check(), "layouts": {}}
    print(f"latent-mode check: {result['latent_mode_check']}", flush=True)
    for name in args.layouts.split(","):
        layout = all_layouts[name]
        section = {"layout": layout, "methods": {}, "verdicts": {}}
        for method in wanted_methods:
            if method in ABLATIONS and name not in ablation_layouts:
                continue
            t0 = time.perf_counter()
            runner.optimisation_logs = []
            images = runner.run(method, layout, seeds)
            seconds = time.perf_counter() - t0
            verdicts = judge_layout(images, layout)
            summary = summarise(verdicts)
            summary["seconds_per_image"] = seconds / len(seeds)
            if method == "optimisation":
                logs = runner.optimisation_logs
                summary["optimisation"] = {
                    "gradient_steps_mean": statistics.mean(sum(not r.get("stopped") for r in log) for log in logs),
                    "stopped_early": sum(any(r.get("stopped") for r in log) for log in logs) / len(logs),
                    "first_loss_mean": statistics.mean(log[0]["total"] for log in logs if log)}
            section["methods"][method] = summary
            section["verdicts"][method] = [[{k: b[k] for k in ("shape", "color", "objects_found", "verdict", "fidelity",
                                                               "position")} for b in row] for row in verdicts]
            if name == "left/right":
                section.setdefault("_grid", {})[method] = images[:args.grid_seeds]
            print(f"{name} {method}: vanishing {summary['vanishing']:.3f} (new {summary['vanishing_new']:.3f}) "
                  f"confusion {summary['confusion']:.3f} all right {summary['all_right']:.3f} "
                  f"(new {summary['all_right_new']:.3f}, with position {summary['all_right_new_position']:.3f}) "
                  f"({seconds:.0f} s)", flush=True)
        base = section["methods"].get("composer")
        for method, s in section["methods"].items():
            if base is not None and method != "composer":
                s["vs_composer"] = paired(base["all_right_seeds"], s["all_right_seeds"])
                s["vs_composer_new"] = paired(base["all_right_new_seeds"], s["all_right_new_seeds"])
        grid_images = section.pop("_grid", None)
        if grid_images:
            grid(grid_images, layout, seeds[:args.grid_seeds], out.with_suffix(".png"))
        result["layouts"][name] = section
    if not args.no_cost:
        reps = 1 if args.quick else args.cost_reps
        times = cost_times(runner, shapes, reps)
        memory = {} if (args.quick or args.no_memory) else cost_memory(shapes)
        ref_t = times["merged_one:1"]["median_s"]
        ref_m = memory.get("merged_one:1", {}).get("above_model_mib")
        rows = {}
        for key, t in times.items():
            method, n = key.split(":")
            row = {"method": COST_LABELS[method], "n": int(n), **t,
                   "time_ratio": t["median_s"] / ref_t}
            if key in memory:
                row["memory"] = memory[key]
                row["memory_ratio"] = memory[key]["above_model_mib"] / ref_m
            rows[key] = row
        result["cost"] = {"canvas": "256×64, N side-by-side boxes of 64 px", "reps": reps, "rows": rows,
                          "memory_method": MEMORY_METHOD}
    result["total_minutes"] = (time.perf_counter() - started) / 60
    write_report(out.with_suffix(".json"), result, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
