"""Train the example concept LoRAs shipped in ``assets/concepts/`` (the Compose tab's demo concepts and the fixtures of
LoRA-Composer's tests and benchmark), with the studio's own LoRA trainer on the micro model.

    python bench/make_concept_loras.py [--out assets/concepts] [--only cross] [--steps N] [--lr LR] [--no-check]
    python bench/make_concept_loras.py --measure 48     # judge the shipped files only (no training)

Each is a novel shape the base model never saw, taught from 24 generator scenes with a rare trigger word. The LoRAs
wrap only the cross-attention keys, values and output (``attn2.to_k/to_v/to_out.0``), so LoRA-Composer applies all
of each file (it skips self-attention, feed-forward and conv deltas). Shapes with thin parts (the cross) are harder to
learn through cross-attention alone, so each concept has its own steps and learning rate. About 100 s per 400 steps
on one CPU core.

After training, each LoRA is checked with plain LoRA application: "TRIGGER a red SHAPE in the center, gray
background" on 12 seeds at 64 px, read by the micro-world judge. A file is written to ``--out`` only when the judge
sees the shape in at least half of them (``--no-check`` writes it regardless). The check prints the old judge's share
(the CNN's label; it decides) next to the new judge's (the shape also well formed, see ``microworld/fidelity.py``) and
the new judge's with the prompt's position ("in the center") checked.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# shape → trigger word and training settings (steps, learning rate, rank; 8 when not given). Not shipped: the judge
# saw the cross in 2 of the 12 check images with 1000 steps at lr 3e-3 (rank 8) and again with 1500 steps at lr 3e-3
# (rank 16); a star (800 steps, lr 4e-3) did no better. Trained only with --only.
CONCEPTS = {
    "heart": {"trigger": "zwx", "steps": 400, "lr": 2e-3},
    "ring": {"trigger": "qwe", "steps": 400, "lr": 2e-3},
    "cross": {"trigger": "vkc", "steps": 1500, "lr": 3e-3, "rank": 16, "shipped": False},
}
TARGETS = ["attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
CHECK_SEEDS = list(range(12))
CHECK_PASS = 0.5


CHECK_POSITION = "in the center"


def check_prompt(shape: str) -> str:
    return f"{CONCEPTS[shape]['trigger']} a red {shape} {CHECK_POSITION}, gray background"


def check_shares(verdicts: list[dict], shape: str) -> dict:
    """Shares of judged check images showing ``shape``: ``old`` (the CNN's label), ``new`` (and well formed),
    ``new_position`` (and in the prompt's place), ``malformed`` (the new judge's verdict)."""
    n = max(1, len(verdicts))
    ok = [v.get("named_shape") == shape and v.get("verdict") == "ok" for v in verdicts]
    return {"old": sum(v["shape"] == shape for v in verdicts) / n, "new": sum(ok) / n,
            "new_position": sum(o and v.get("position") == CHECK_POSITION for o, v in zip(ok, verdicts)) / n,
            "malformed": sum(v.get("verdict") == "malformed" for v in verdicts) / n}


def plain_lora_shares_on(model, path: Path | None, shape: str, seeds: list[int]) -> dict:
    """:func:`check_shares` of the check prompt on ``seeds``, with the LoRA at ``path`` (``None``: the base model)."""
    from pipelines.generation import adapters_applied
    from microworld.evaluation import sample
    from microworld.judge import judge_images

    with adapters_applied(model, ((str(path), 1.0),) if path else ()):
        images = sample(model.pipe, [check_prompt(shape)] * len(seeds), seeds)
    return check_shares(judge_images(images), shape)


def measure_shipped(folder: Path, n: int) -> dict:
    """Each shipped concept LoRA and the base model on its check prompt, ``n`` seeds."""
    from models.loading import load_model

    model = load_model(REPO / "assets" / "micro-sd")
    model.pipe.set_progress_bar_config(disable=True)
    seeds = list(range(n))
    rows = {}
    for shape, settings in CONCEPTS.items():
        path = folder / f"{shape}.safetensors"
        if not path.is_file():
            continue
        rows[shape] = {"trigger": settings["trigger"], "prompt": check_prompt(shape),
                       "base": plain_lora_shares_on(model, None, shape, seeds),
                       "lora": plain_lora_shares_on(model, path, shape, seeds)}
    return {"seeds": n, "rows": rows, "settings": {"steps": 20, "guidance": 4.0, "size": 64, "strength": 1.0}}


def measure_table(r: dict) -> str:
    from report import new_judge_note, rate

    lines = ["# The shipped concept LoRAs in the micro world", "",
             f"Each LoRA applied at strength 1.0 to the whole micro model (plain LoRA application, no composer) on its "
             f"check prompt, seeds 0–{r['seeds'] - 1} ({r['seeds']} images, 20 steps, guidance 4.0), and the base "
             f"model on the same prompts and seeds. Share of images showing the concept's shape.", "",
             "| concept | prompt | model | old judge | new judge | new judge, in the center | malformed (new) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for shape, row in r["rows"].items():
        for label in ("base", "lora"):
            c = row[label]
            lines.append(f"| {shape} | `{row['prompt']}` | {'base model' if label == 'base' else 'with the LoRA'} "
                         f"| {rate(c['old'])} | {rate(c['new'])} | {rate(c['new_position'])} | {rate(c['malformed'])} |")
    return "\n".join(lines + ["", new_judge_note(), ""])


def main() -> int:
    import torch

    from models.loading import load_model
    from microworld.evaluation import novel_shape_set
    from trainers.lora import LoraMethod
    from trainers.loop import TrainConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "assets" / "concepts"))
    parser.add_argument("--steps", type=int, help="override every concept's steps")
    parser.add_argument("--lr", type=float, help="override every concept's learning rate")
    parser.add_argument("--rank", type=int, help="override every concept's rank (default 8)")
    parser.add_argument("--only", choices=sorted(CONCEPTS), help="train just this concept")
    parser.add_argument("--no-check", action="store_true", help="write the file without the plain-LoRA check")
    parser.add_argument("--measure", type=int, metavar="N",
                        help="train nothing: judge the shipped files in --out on N seeds, write bench/results/concept_loras")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.measure:
        from report import measure_micro

        return measure_micro(REPO / "assets" / "micro-sd", REPO / "bench" / "results" / "concept_loras.json",
                             lambda: measure_shipped(Path(args.out), args.measure), measure_table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="concept-loras-"))
    model = None
    failed = 0
    for shape, settings in CONCEPTS.items():
        if (args.only and shape != args.only) or (not args.only and not settings.get("shipped", True)):
            continue
        data = novel_shape_set(work / shape, shape, 24)
        started = time.perf_counter()
        trained = work / f"{shape}.safetensors"
        config = TrainConfig(data=str(data), out=str(trained), model=str(REPO / "assets" / "micro-sd"),
                             steps=args.steps or settings["steps"], batch_size=4, lr=args.lr or settings["lr"],
                             trigger=settings["trigger"], checkpoint_every=10**6, seed=0,
                             method_options={"rank": args.rank or settings.get("rank", 8), "targets": TARGETS})
        result = train(config, LoraMethod(), work / f"{shape}-run")
        first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
        line = (f"{shape} ({settings['trigger']}, rank {config.method_options['rank']}, {config.steps} steps, "
                f"lr {config.lr:g}): {result.status}, "
                f"loss {first:.4f} -> {last:.4f}, {time.perf_counter() - started:.0f} s")
        if not args.no_check:
            if model is None:
                model = load_model(REPO / "assets" / "micro-sd")
                model.pipe.set_progress_bar_config(disable=True)
            shares = plain_lora_shares_on(model, trained, shape, CHECK_SEEDS)
            share = shares["old"]
            line += (f"; plain LoRA: judge sees a {shape} in {share:.0%} of {len(CHECK_SEEDS)} seeds (old judge; "
                     f"new judge {shares['new']:.0%}, with position {shares['new_position']:.0%}, "
                     f"malformed {shares['malformed']:.0%})")
            if share < CHECK_PASS:
                print(line + f" (below {CHECK_PASS:.0%}: not written)")
                failed += 1
                continue
        shutil.copyfile(trained, out / trained.name)
        print(f"{line} -> {out / trained.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
