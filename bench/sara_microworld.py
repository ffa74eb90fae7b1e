"""SaRA in the micro world: is a novel concept learned, and is the prior kept? Against LoRA and full fine-tuning.

    python bench/sara_microworld.py [--steps 400] [--images 24] [--prior 24] [--seeds 24]

Every method trains on the same folder (images of the novel shape ``star`` captioned with the trigger ``sks``), with
the same prior-preservation folder (one-object base-set scenes, captions as written), for the same steps and batch,
from the shipped micro base model:
- SaRA with λ ∈ {5e-3, 5e-4, 0} (the spec's ablation), budget 5 %, progressive adjustment at half-way;
- a LoCon-style LoRA (attention, feed-forward and ResNet convs) whose rank gives about SaRA's trainable count;
- full fine-tuning of the same Linear/Conv weights (SaRA's machinery with a 100 % budget, no regulariser).
The judge then reads samples: *learned* = share of trigger-prompt samples judged a star; *prior* = share of
base-set prompts (one object, fresh seeds) whose shape and colour are both judged right, with the adapter applied.
Both by the old judge (the CNN's labels) and the new one (labels counted only on a well-formed object, see
``microworld/fidelity.py``), and by the new one with the prompts' positions checked too.
Writes ``bench/results/sara_microworld.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = REPO / "assets" / "micro-sd"
NOVEL = "star"
TRIGGER = "sks"
LOCON_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                 "conv1", "conv2"]


def judge_rates(model, adapters: tuple, n_seeds: int, seed: int) -> dict:
    from microworld.evaluation import concept_and_prior

    return concept_and_prior(model, adapters, f"{TRIGGER} a red {NOVEL} in the center, gray background", NOVEL,
                             n_seeds, seed)


def lora_rank_for(count: int, model_dir: Path) -> tuple[int, int]:
    """The LoCon rank whose trainable count is closest to ``count`` (and that count)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    layers = [m for n, m in unet.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(n.endswith(t) for t in LOCON_TARGETS)]

    def params(rank: int) -> int:
        total = 0
        for m in layers:
            if isinstance(m, torch.nn.Linear):
                total += rank * (m.in_features + m.out_features)
            else:
                total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        return total

    rank = min(range(1, 257), key=lambda r: abs(params(r) - count))
    return rank, params(rank)


def run(args: argparse.Namespace) -> dict:
    from accelerate.state import AcceleratorState

    from models.loading import load_model
    from trainers.lora import LoraMethod
    from trainers.loop import TrainConfig, train
    from trainers.sara import SaraMethod, SaraOptions, plan_selection

    from microworld.evaluation import base_set, novel_shape_set

    work = Path(tempfile.mkdtemp(prefix="sara-bench-"))
    data = novel_shape_set(work / "data", NOVEL, args.images)
    prior = str(base_set(work / "prior", args.prior, min_radius=args.prior_min_radius)) if args.prior else None
    model = load_model(MODEL)
    model.pipe.set_progress_bar_config(disable=True)
    plan = plan_selection(model.pipe.unet, SaraOptions(budget=args.budget))
    rank, lora_count = lora_rank_for(plan.count, MODEL)
    methods = {
        "SaRA λ=5e-3": ("sara", {"budget": args.budget, "lambda_rank": 5e-3}, args.sara_lr),
        "SaRA λ=5e-4": ("sara", {"budget": args.budget, "lambda_rank": 5e-4}, args.sara_lr),
        "SaRA λ=0": ("sara", {"budget": args.budget, "lambda_rank": 0.0}, args.sara_lr),
        f"LoRA r={rank} (LoCon)": ("lora", {"rank": rank, "targets": LOCON_TARGETS}, args.lora_lr),
        "full fine-tuning": ("sara", {"budget": "100%", "lambda_rank": 0.0, "progressive": 0.0}, args.full_lr),
    }
    rows = [{"method": "base model", "trainable": 0, **judge_rates(model, (), args.seeds, args.seed)}]
    print(json.dumps(rows[-1]), flush=True)
    for label, (kind, options, lr) in methods.items():
        if args.only and not any(o in label for o in args.only.split(",")):
            continue
        AcceleratorState._reset_state(reset_partial_state=False)
        out = work / f"{len(rows)}.safetensors"
        config = TrainConfig(data=str(data), out=str(out), model=str(MODEL), steps=args.steps, batch_size=4,
                             lr=lr, trigger=TRIGGER, checkpoint_every=args.steps + 1, seed=0,
                             method_options=options, prior_data=prior,
                             prior_weight=args.prior_weight)
        method = SaraMethod() if kind == "sara" else LoraMethod()
        started = time.perf_counter()
        result = train(config, method, work / f"run-{len(rows)}")
        seconds = time.perf_counter() - started
        trainable = method.plan.count if kind == "sara" else lora_count
        row = {"method": label, "trainable": trainable, "lr": lr if lr is not None else method.default_lr(),
               "train_seconds": round(seconds, 1), "loss_first": round(sum(result.losses[:20]) / 20, 4),
               "loss_last": round(sum(result.losses[-20:]) / 20, 4),
               **judge_rates(model, ((str(out), 1.0),), args.seeds, args.seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "settings": {"steps": args.steps, "images": args.images, "prior": args.prior, "batch": 4,
                                       "prior_weight": args.prior_weight, "prior_min_radius": args.prior_min_radius,
                                       "seeds": args.seeds,
                                       "seed": args.seed, "budget": args.budget, "threshold": plan.threshold,
                                       "sara_count": plan.count, "threads": torch.get_num_threads(),
                                       "model": str(MODEL.relative_to(REPO))}}


def markdown(result: dict) -> str:
    from report import new_judge_note, rate

    s = result["settings"]
    lines = ["# SaRA in the micro world", "",
             f"Novel shape `{NOVEL}` from {s['images']} images (+ {s['prior']} prior-preservation images"
             + (f" of object size {s.get('prior_min_radius', 0.13):g}–0.3 at weight {s.get('prior_weight', 1.0):g}"
                if s['prior'] else "") + f"), {s['steps']} steps, batch {s['batch']}, micro base "
             f"model; judged on {s['seeds']} samples per measure (seed {s['seed']}). SaRA budget {s['budget']} "
             f"(θ = {s['threshold']:.4g}, {s['sara_count']:,} weights).", "",
             "| method | trainable | lr | learned (star seen): old judge | new judge | new, with position "
             "| prior (base prompts right): old judge | new judge | new, with position "
             "| malformed (learned / prior) | loss first→last | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        loss = f"{r['loss_first']:.3f}→{r['loss_last']:.3f}" if "loss_first" in r else ""
        lr = f"{r['lr']:.2g}" if "lr" in r else ""
        malformed = (f"{rate(r.get('learned_malformed'))} / {rate(r.get('prior_malformed'))}"
                     if "prior_malformed" in r else "—")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {lr} | {rate(r['learned'])} "
                     f"| {rate(r.get('learned_new'))} | {rate(r.get('learned_new_position'))} | {rate(r['prior'])} "
                     f"| {rate(r.get('prior_new'))} | {rate(r.get('prior_new_position'))} | {malformed} | {loss} "
                     f"| {r.get('train_seconds', '')} |")
    lines += ["", new_judge_note() + " Malformed: share of the samples the new judge finds malformed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--prior", type=int, default=24, help="prior-preservation images (0: none)")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="weight of the prior-preservation loss")
    parser.add_argument("--prior-min-radius", type=float, default=0.13,
                        help="smallest object in the prior images (relative; the star images use 0.2-0.3)")
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--budget", default="5%")
    parser.add_argument("--sara-lr", type=float, default=None, help="default: SaRA's rule from θ")
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--only", help="comma-separated substrings of method labels to run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sara_microworld.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from report import measure_micro

    return measure_micro(MODEL, args.out, lambda: run(args), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
