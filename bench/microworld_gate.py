"""The micro base model's quality gate, measured by the judge on fresh seeds.

    python bench/microworld_gate.py [--model assets/micro-sd] [--single 120] [--pairs 60] [--seed 2024]

Gate (spec): single-object base prompts have shape and colour both right in >= 80 % of samples; two-object prompts
show both named objects in >= 50 %. Prompts come from the scene generator's caption grammar; single-object samples
are judged whole, two-object samples are split into objects by contrast with the background and each crop judged.
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
                        "objects": [(o.color, o.shape) for o in scene.objects]})
    for index in range(n_pairs):
        scene = generate_scene([seed, 2, index], SceneConfig(min_objects=2, max_objects=2))
        pairs.append({"prompt": scene.caption, "seed": seed * 10_000 + 5_000 + index,
                      "objects": [(o.color, o.shape) for o in scene.objects]})
    return singles, pairs


@torch.no_grad()
def measure_gate(pipe, n_single: int = 120, n_pairs: int = 60, seed: int = 2024, steps: int = 20,
                 guidance: float = 4.0, keep_images: bool = False) -> dict:
    """Generate the gate's prompts with ``pipe`` and return rates, verdicts and pass/fail."""
    from microworld.judge import judge_images, judge_scene

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
    single_ok, color_ok, shape_ok = [], [], []
    for item, verdict in zip(singles, verdicts):
        color, shape = item["objects"][0]
        color_ok.append(verdict["color"] == color)
        shape_ok.append(verdict["shape"] == shape)
        single_ok.append(color_ok[-1] and shape_ok[-1])
        item["judged"] = [verdict["color"], verdict["shape"]]
    pair_images = generate(pairs)
    pair_ok, named_found = [], []
    for item, image in zip(pairs, pair_images):
        found = {(r["color"], r["shape"]) for r in judge_scene(image)}
        hits = [tuple(obj) in found for obj in item["objects"]]
        named_found += hits
        pair_ok.append(all(hits))
        item["judged"] = sorted(f"{c} {s}" for c, s in found)
    single_rate, pair_rate = float(np.mean(single_ok)), float(np.mean(pair_ok))
    result = {
        "single_object": {"both_right": round(single_rate, 4), "color_right": round(float(np.mean(color_ok)), 4),
                          "shape_right": round(float(np.mean(shape_ok)), 4), "n": n_single, "gate": SINGLE_GATE},
        "two_objects": {"both_present": round(pair_rate, 4), "named_object_found": round(float(np.mean(named_found)), 4),
                        "n": n_pairs, "gate": PAIR_GATE},
        "passed": bool(single_rate >= SINGLE_GATE and pair_rate >= PAIR_GATE),
        "settings": {"seed": seed, "steps": steps, "guidance": guidance, "size": 64,
                     "scheduler": type(pipe.scheduler).__name__},
        "seconds": round(time.time() - started, 1),
        "samples": {"single": [{"prompt": s["prompt"], "judged": " ".join(s["judged"])} for s in singles],
                    "pairs": [{"prompt": p["prompt"], "judged": p["judged"]} for p in pairs]},
    }
    if keep_images:
        result["images"] = {"single": single_images, "pairs": pair_images}
    return result


def markdown(result: dict) -> str:
    single, pairs, settings = result["single_object"], result["two_objects"], result["settings"]
    verdict = "passed" if result["passed"] else "**missed**"
    return "\n".join([
        f"# Micro base model quality gate: {verdict}", "",
        f"`{result['model']}`, judged by the shipped judge on fresh seeds (seed {settings['seed']}); "
        f"{settings['scheduler']} {settings['steps']} steps, guidance {settings['guidance']}, "
        f"{settings['size']} px; {result['seconds']} s.", "",
        "| prompts | n | measure | rate | gate |", "|---|---:|---|---:|---:|",
        f"| one object | {single['n']} | shape and colour right | {single['both_right']:.1%} "
        f"| ≥ {single['gate']:.0%} |",
        f"| | | colour right | {single['color_right']:.1%} | |",
        f"| | | shape right | {single['shape_right']:.1%} | |",
        f"| two objects | {pairs['n']} | both named objects present | {pairs['both_present']:.1%} "
        f"| ≥ {pairs['gate']:.0%} |",
        f"| | | a named object present | {pairs['named_object_found']:.1%} | |", ""])


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
    print(json.dumps({k: result[k] for k in ("single_object", "two_objects", "passed", "seconds")}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
