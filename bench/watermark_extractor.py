"""How well the shipped watermark extractor reads keys its own encoder wrote, under every attack, and how often it
flags clean images.

    python bench/watermark_extractor.py [--extractor FILE] [--images 48] [--clean 1000] [--fpr 1e-2]

Marked images: fresh micro-world scenes (other seeds than training) with a random key each, written by the
extractor's encoder, saved as 8-bit images, then attacked (``pipelines.watermark.attacks.ATTACKS``). Clean images:
``--clean`` other scenes, each compared with one random key; the share flagged at ``--fpr`` and at 1e-6 must stay at
the nominal rate (within sampling error) for the p-values to be honest. Writes
``bench/results/watermark_extractor.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run(args: argparse.Namespace) -> dict:
    from microworld.scenes import SceneConfig, generate_scenes
    from pipelines.watermark.attacks import ATTACKS, attack_image
    from microworld.watermark_evaluation import bit_accuracy, encoder_marked
    from pipelines.watermark.extractor import extractor_hash, load_encoder, load_extractor
    from pipelines.watermark.shipped import default_extractor_path
    from pipelines.watermark.stats import threshold
    from pipelines.watermark.verify import read_bits

    path = Path(args.extractor) if args.extractor else default_extractor_path()
    extractor = load_extractor(path)
    encoder = load_encoder(path.with_suffix(".encoder.safetensors"))
    bits = extractor.config.bits
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    per_attack: dict[str, list[float]] = {name: [] for name in ATTACKS}
    for scene in generate_scenes(args.images, seed=10_000 + args.seed, config=SceneConfig()):
        key = torch.randint(0, 2, (bits,), generator=gen).float()
        image = encoder_marked(encoder, scene.to_pil(), key, rng)
        for name in ATTACKS:
            per_attack[name].append(bit_accuracy(extractor, attack_image(image, name), key))
    matched = []
    for scene in generate_scenes(args.clean, seed=20_000 + args.seed, config=SceneConfig()):
        key = torch.randint(0, 2, (bits,), generator=gen).float()
        matched.append(int((read_bits(extractor, scene.to_pil()) == key).sum()))
    mean = sum(matched) / len(matched)
    std = math.sqrt(sum((m - mean) ** 2 for m in matched) / len(matched))
    flags = {f"{fpr:g}": sum(m >= threshold(bits, fpr) for m in matched) for fpr in (args.fpr, 1e-6)}
    return {"extractor": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "hash": extractor_hash(extractor), "bits": bits,
            "attacks": {name: {"bit_accuracy": sum(v) / len(v), "min": min(v)} for name, v in per_attack.items()},
            "clean": {"images": len(matched), "matched_mean": mean, "matched_std": std,
                      "binomial_std": math.sqrt(bits) / 2, "flagged": flags},
            "settings": {"images": args.images, "clean": args.clean, "fpr": args.fpr, "seed": args.seed,
                         "threads": torch.get_num_threads()}}


def markdown(r: dict) -> str:
    c = r["clean"]
    lines = ["# Watermark extractor", "",
             f"Extractor `{r['extractor']}` (hash `{r['hash']}`, {r['bits']} bits). Keys written by its own encoder "
             f"into {r['settings']['images']} fresh micro-world scenes (64 px), saved as 8-bit images, then attacked:",
             "", "| attack | bit accuracy | worst image |", "|---|---:|---:|"]
    for name, a in r["attacks"].items():
        lines.append(f"| {name} | {a['bit_accuracy']:.3f} | {a['min']:.3f} |")
    lines += ["", f"Clean images ({c['images']} other scenes, one random key each): matched bits {c['matched_mean']:.2f} "
                  f"± {c['matched_std']:.2f} (a fair coin per bit: {r['bits'] / 2:.0f} ± {c['binomial_std']:.2f}).", "",
              "| false-positive rate | flagged | expected |", "|---:|---:|---:|"]
    for fpr, n in c["flagged"].items():
        lines.append(f"| {fpr} | {n} | {float(fpr) * c['images']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extractor")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--clean", type=int, default=1000)
    parser.add_argument("--fpr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "watermark_extractor.json"))
    args = parser.parse_args(argv)
    from report import write_report

    torch.set_num_threads(1)
    result = run(args)
    write_report(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
