"""The watermark trainer's defaults over many random keys: does every key read back, and at what image cost?

    python bench/watermark_keys.py [--keys 8] [--seed 2026] [--images 8] [--workers 2]

The figure a user meets is not one fixed key's: keys differ in how cleanly the decoder can write them. Each key is
drawn at random (from a seeded generator, so the run can be repeated) and trained with the trainer's default settings
(`WatermarkConfig()`: only the key and the output differ), exactly as `launch.py watermark train` with no flags does.
Per key: steps run, seconds (one CPU thread per key), the run's ending (done, or done with warnings and why), bit
accuracy and PSNR over its last five training steps, and on ``--images`` fresh generations (other prompts and seeds)
the bit accuracy, how many are flagged at FPR 1e-6 and the PSNR against the same generation without the watermark.
Writes ``bench/results/watermark_keys.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MODEL = REPO / "assets" / "micro-sd"


def draw_keys(n: int, seed: int, bits: int = 48) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(bits):0{bits // 4}x}" for _ in range(n)]


def one_key(job: tuple[str, int, int, int | None]) -> dict:
    """Train the default watermark for ``key`` and measure it (runs in a worker process with one thread)."""
    key, images, seed, steps = job
    import torch

    torch.set_num_threads(1)
    from core.image_metrics import psnr
    from microworld.watermark_evaluation import fresh_generations
    from models.loading import load_model
    from pipelines.watermark.extractor import load_extractor
    from pipelines.watermark.shipped import default_extractor_path
    from pipelines.watermark.verify import verify
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    work = Path(tempfile.mkdtemp(prefix="wm-keys-"))
    model = load_model(MODEL)
    config = WatermarkConfig(out=str(work / "wm.safetensors"), key=key)
    if steps:  # a smoke test of this script only; the table's figures use the defaults
        config.max_steps = steps
    started = time.perf_counter()
    run = train_watermark(config, work / "run", model=model)
    seconds = time.perf_counter() - started
    last = run.history[-5:]
    plain, marked = fresh_generations(model, work / "wm.safetensors", images, seed)
    on = verify([(str(i), im) for i, im in enumerate(marked)], key, load_extractor(default_extractor_path()))
    return {"key": key, "steps": run.result.step, "seconds": round(seconds, 1),
            "seconds_to_99": None if run.seconds_to_99 is None else round(run.seconds_to_99, 1),
            "ending": run.result.label, "warnings": run.result.warnings,
            "train_bits": round(fmean(h["bit_accuracy"] for h in last), 4),
            "train_psnr": round(fmean(h["psnr"] for h in last), 2),
            "fresh_bits": round(float(np.mean([v.bit_accuracy for _, v in on.per_image])), 4),
            "fresh_flagged": sum(v.watermarked for _, v in on.per_image),
            "fresh_psnr": round(float(np.mean([psnr(np.asarray(a), np.asarray(b)) for a, b in zip(plain, marked)])),
                                2)}


def run(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    from trainers.watermark_config import WatermarkConfig

    keys = draw_keys(args.keys, args.seed)
    jobs = [(key, args.images, args.seed, args.steps) for key in keys]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        rows = pool.map(one_key, jobs, chunksize=1)
    defaults = {k: v for k, v in asdict(WatermarkConfig(max_steps=args.steps or WatermarkConfig.max_steps)).items()
                if k in ("rank", "alpha", "lr", "batch_size", "max_steps", "latents", "psnr_floor", "stop_bit_accuracy",
                         "stop_psnr", "patience_stop", "noise_probability")}
    met = [r for r in rows if r["train_bits"] >= defaults["stop_bit_accuracy"] and r["train_psnr"] >= defaults["stop_psnr"]]
    return {"rows": rows, "defaults": defaults, "keys_meeting_both_targets": len(met),
            "settings": {**vars(args), "threads_per_key": 1}, "date": time.strftime("%Y-%m-%d")}


def markdown(r: dict) -> str:
    d, s, rows = r["defaults"], r["settings"], r["rows"]
    n = s["images"]

    def mean(k: str) -> float:
        return fmean(row[k] for row in rows)

    return "\n".join([
        f"# Watermark LoRA defaults over {len(rows)} random keys ({r['date']})", "",
        f"Each key drawn at random (seeded generator, seed {s['seed']}) and trained with the trainer's defaults: rank "
        f"{d['rank']}, alpha {d['alpha']:g}, lr {d['lr']:g}, batch {d['batch_size']}, at most {d['max_steps']} steps "
        f"on {d['latents']} latents sampled from the micro model, PSNR floor {d['psnr_floor']:g} dB; a run stops "
        f"early once bit accuracy ≥ {d['stop_bit_accuracy']} and PSNR ≥ {d['stop_psnr']:g} dB hold for "
        f"{d['patience_stop']} steps. *Training*: mean of the last five steps. *Fresh*: {n} new generations (other "
        f"prompts and seeds) with and without the watermark; flagged at FPR 1e-6; PSNR against the same generation "
        "without it. One CPU thread per key.", "",
        f"**Both targets (bits ≥ {d['stop_bit_accuracy']}, PSNR ≥ {d['stop_psnr']:g} dB) met by "
        f"{r['keys_meeting_both_targets']} of {len(rows)} keys.**", "",
        "| key | steps | seconds | ending | training bits | training PSNR | fresh bits | fresh flagged | fresh PSNR |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        *[f"| `{row['key']}` | {row['steps']} | {row['seconds']:.0f} | {row['ending']} | {row['train_bits']:.3f} | "
          f"{row['train_psnr']:.1f} dB | {row['fresh_bits']:.3f} | {row['fresh_flagged']}/{n} | "
          f"{row['fresh_psnr']:.1f} dB |" for row in rows],
        f"| **mean** | {mean('steps'):.0f} | {mean('seconds'):.0f} | | {mean('train_bits'):.3f} | "
        f"{mean('train_psnr'):.1f} dB | {mean('fresh_bits'):.3f} | {mean('fresh_flagged'):.1f}/{n} | "
        f"{mean('fresh_psnr'):.1f} dB |", "",
        "Warnings the runs ended with:", "",
        *[f"- `{row['key']}`: " + ("; ".join(row["warnings"]) or "none") for row in rows], ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, help="override the default maximum steps (a smoke test of the script)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "watermark_keys.json"))
    args = parser.parse_args(argv)
    from report import measure_micro

    return measure_micro(MODEL, args.out, lambda: run(args), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
