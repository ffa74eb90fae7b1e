"""The micro base model's quality gate, measured by the judge on fresh seeds.

    python bench/microworld_gate.py [--model assets/micro-sd] [--single 120] [--pairs 60] [--seed 2024]

Gate (spec): single-object base prompts have shape and colour both right in >= 80 % of samples; two-object prompts
show both named objects in >= 50 %. Prompts come from the scene generator's caption grammar; single-object samples
are judged whole, two-object samples are split into objects by contrast with the background and each crop judged.
Every rate comes from the old judge (the judge CNN's labels alone) and from the new one (the same labels, counted only
on a well-formed object: verdict ``ok``, see ``microworld/fidelity.py``), and the new one also with the prompt's
positions checked; the gate is decided for both judges (``passed``: old, ``passed_new``: new, positions not checked).
Writes ``bench/results/microworld.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SINGLE_GATE = 0.80
PAIR_GATE = 0.50


def gate_prompts(n_single: int, n_pairs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Captions (and their labels) of random base-set scenes with one and with two objects."""
    from microworld.scenes import SceneConfig, generate_scene

    singles, pairs = [], []
    for index in range(n_single):
        scene = generate_scene([seed, 1, index], SceneConfig(max_objects=1))
        singles.append({"prompt": scene.caption, "seed": seed * 10_000 + index,
                        "objects": [(o.color, o.shape) for o in scene.objects],
                        "positions": [o.position for o in scene.objects]})
    for index in range(n_pairs):
        scene = generate_scene([seed, 2, index], SceneConfig(min_objects=2, max_objects=2))
        pairs.append({"prompt": scene.caption, "seed": seed * 10_000 + 5_000 + index,
                      "objects": [(o.color, o.shape) for o in scene.objects],
                      "positions": [o.position for o in scene.objects]})
    return singles, pairs


@torch.no_grad()
def measure_gate(pipe, n_single: int = 120, n_pairs: int = 60, seed: int = 2024, steps: int = 20,
                 guidance: float = 4.0, keep_images: bool = False) -> dict:
    """Generate the gate's prompts with ``pipe`` and return rates, verdicts and pass/fail."""
    from microworld.evaluation import named_found
    from microworld.judge import is_right, judge_images, judge_scene

    singles, pairs = gate_prompts(n_single, n_pairs, seed)
    started = time.time()

    def generate(items: list[dict]) -> list:
        images = []
        for start in range(0, len(items), 16):
            chunk = items[start:start + 16]
            generators = [torch.Generator().manual_seed(item["seed"]) for item in chunk]
            images += pipe([item["prompt"] for item in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           generator=generators, height=64, width=64).images
        return images

    single_images = generate(singles)
    verdicts = judge_images(single_images)
    rows = {key: [] for key in ("color", "shape", "both", "color_new", "shape_new", "both_new", "both_new_position",
                                "malformed", "empty")}
    for item, verdict in zip(singles, verdicts):
        (color, shape), where = item["objects"][0], item["positions"][0]
        well_formed = verdict["verdict"] == "ok"
        rows["color"].append(verdict["color"] == color)
        rows["shape"].append(verdict["shape"] == shape)
        rows["both"].append(rows["color"][-1] and rows["shape"][-1])
        rows["color_new"].append(well_formed and verdict["color"] == color)
        rows["shape_new"].append(well_formed and verdict["named_shape"] == shape)
        rows["both_new"].append(is_right(verdict, shape, color))
        rows["both_new_position"].append(is_right(verdict, shape, color, where))
        rows["malformed"].append(verdict["verdict"] == "malformed")
        rows["empty"].append(verdict["verdict"] == "empty")
        item["judged"] = [verdict["color"], verdict["shape"]]
        item["judged_new"] = {k: verdict[k] for k in ("verdict", "named_shape", "fidelity", "position")}
    pair_images = generate(pairs)
    pair_ok, named_old, pair_new, named_new, pair_pos, named_pos = [], [], [], [], [], []
    for item, image in zip(pairs, pair_images):
        records = judge_scene(image)
        found = {(r["color"], r["shape"]) for r in records}
        hits = [tuple(obj) in found for obj in item["objects"]]
        named_old += hits
        pair_ok.append(all(hits))
        hits = named_found([(c, s, None) for c, s in item["objects"]], records)
        named_new += hits
        pair_new.append(all(hits))
        hits = named_found([(c, s, where) for (c, s), where in zip(item["objects"], item["positions"])], records)
        named_pos += hits
        pair_pos.append(all(hits))
        item["judged"] = sorted(f"{c} {s}" for c, s in found)
        item["judged_new"] = sorted(f"{r['color']} {r['named_shape']} {r['position']} ({r['verdict']}, {r['fidelity']:.2f})"
                                    for r in records)

    def mean(values: list) -> float:
        return round(float(np.mean(values)), 4) if values else 0.0

    single_rate, pair_rate = mean(rows["both"]), mean(pair_ok)
    single_new, pair_new_rate = mean(rows["both_new"]), mean(pair_new)
    single_pos, pair_pos_rate = mean(rows["both_new_position"]), mean(pair_pos)
    result = {
        "single_object": {"both_right": single_rate, "color_right": mean(rows["color"]),
                          "shape_right": mean(rows["shape"]),
                          "both_right_new": single_new, "color_right_new": mean(rows["color_new"]),
                          "shape_right_new": mean(rows["shape_new"]), "both_right_new_position": single_pos,
                          "malformed": mean(rows["malformed"]), "empty": mean(rows["empty"]),
                          "n": n_single, "gate": SINGLE_GATE},
        "two_objects": {"both_present": pair_rate, "named_object_found": mean(named_old),
                        "both_present_new": pair_new_rate, "named_object_found_new": mean(named_new),
                        "both_present_new_position": pair_pos_rate, "named_object_found_new_position": mean(named_pos),
                        "n": n_pairs, "gate": PAIR_GATE},
        "passed": bool(single_rate >= SINGLE_GATE and pair_rate >= PAIR_GATE),
        "passed_new": bool(single_new >= SINGLE_GATE and pair_new_rate >= PAIR_GATE),
        "passed_new_position": bool(single_pos >= SINGLE_GATE and pair_pos_rate >= PAIR_GATE),
        "settings": {"seed": seed, "steps": steps, "guidance": guidance, "size": 64,
                     "scheduler": type(pipe.scheduler).__name__},
        "seconds": round(time.time() - started, 1),
        "samples": {"single": [{"prompt": s["prompt"], "judged": " ".join(s["judged"]), "judged_new": s["judged_new"]}
                               for s in singles],
                    "pairs": [{"prompt": p["prompt"], "judged": p["judged"], "judged_new": p["judged_new"]}
                              for p in pairs]},
    }
    if keep_images:
        result["images"] = {"single": single_images, "pairs": pair_images}
    return result


def markdown(result: dict) -> str:
    from report import new_judge_note, rate

    single, pairs, settings = result["single_object"], result["two_objects"], result["settings"]

    def verdict(key: str) -> str:
        return "—" if key not in result else ("passed" if result[key] else "**missed**")

    return "\n".join([
        f"# Micro base model quality gate: {verdict('passed')} (old judge), {verdict('passed_new')} (new judge)", "",
        f"`{result['model']}`, judged by the shipped judge on fresh seeds (seed {settings['seed']}); "
        f"{settings['scheduler']} {settings['steps']} steps, guidance {settings['guidance']}, "
        f"{settings['size']} px; {result['seconds']} s.", "",
        "| prompts | n | measure | old judge | new judge | new judge, with position | gate |",
        "|---|---:|---|---:|---:|---:|---:|",
        f"| one object | {single['n']} | shape and colour right | {rate(single['both_right'], 1)} "
        f"| {rate(single.get('both_right_new'), 1)} | {rate(single.get('both_right_new_position'), 1)} "
        f"| ≥ {single['gate']:.0%} |",
        f"| | | colour right | {rate(single['color_right'], 1)} | {rate(single.get('color_right_new'), 1)} | | |",
        f"| | | shape right | {rate(single['shape_right'], 1)} | {rate(single.get('shape_right_new'), 1)} | | |",
        f"| | | malformed / empty (new judge) | | {rate(single.get('malformed'), 1)} / "
        f"{rate(single.get('empty'), 1)} | | |",
        f"| two objects | {pairs['n']} | both named objects present | {rate(pairs['both_present'], 1)} "
        f"| {rate(pairs.get('both_present_new'), 1)} | {rate(pairs.get('both_present_new_position'), 1)} "
        f"| ≥ {pairs['gate']:.0%} |",
        f"| | | a named object present | {rate(pairs['named_object_found'], 1)} "
        f"| {rate(pairs.get('named_object_found_new'), 1)} | {rate(pairs.get('named_object_found_new_position'), 1)} "
        "| |",
        f"| gate | | | {verdict('passed')} | {verdict('passed_new')} | {verdict('passed_new_position')} | |", "",
        new_judge_note() + " Two objects, new judge: each named object found as its own well-formed object of "
        "that shape and colour (with position: in its named place).", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "assets" / "micro-sd"))
    parser.add_argument("--single", type=int, default=120)
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000, help="default: fresh")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "microworld.json"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    model = Path(args.model).resolve()
    shown = str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model)
    result = {"model": shown, **measure_gate(pipe, args.single, args.pairs, args.seed, args.steps,
                                                       args.guidance)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("single_object", "two_objects", "passed", "passed_new",
                                             "passed_new_position", "seconds")}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
