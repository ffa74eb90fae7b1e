"""Super-resolution benchmark: the DSCLoRA spec's table, measured side by side in one run.

    python bench/sr_benchmark.py [--steps 300] [--threads 1]

Rows: bicubic, the shipped default SPAN, the official DSCF weights (when ../shared has them), and DSCLoRA fine-tunes
of the start model (official if present, else shipped) with and without the spatial-affinity loss. Columns: PSNR /
SSIM on the Y channel (4-pixel border shaved, LR by Pillow bicubic) on Set5, on held-out photos never trained on, and
on a "user domain" (pixel-art micro-world scenes, the fine-tunes' own domain, other scenes than they trained on);
parameters; time per output megapixel as a ratio against bicubic and against the unmerged LoRA network, timed
interleaved on the same input. Writes bench/results/sr.json and bench/results/sr.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
SET5 = SHARED / "data" / "set5"
DSCF = SHARED / "models" / "dscf-x4" / "team23_DSCF.pth"
SCALE = 4


def pixel_art_scenes(n: int, seed: int) -> list[Image.Image]:
    """The user-domain set: micro-world scenes blown up ×4 with hard pixel edges (what photo upscalers smooth)."""
    from microworld.scenes import SceneConfig, generate_scenes

    config = SceneConfig(size=48, fills=("solid", "stripes", "checker"), min_objects=2, max_objects=3)
    scenes = generate_scenes(n, seed=seed, config=config)
    return [scene.to_pil().resize((192, 192), Image.Resampling.NEAREST) for scene in scenes]


def evaluation_sets(work: Path) -> dict[str, list[Image.Image]]:
    from trainers.sr_pretrain import HELD_OUT_PHOTOS, write_photos

    sets = {}
    if SET5.is_dir():
        sets["Set5"] = [Image.open(p).convert("RGB") for p in sorted(SET5.glob("*.png"))]
    sets["held-out photos"] = [Image.open(p).convert("RGB") for p in write_photos(work / "held-out", HELD_OUT_PHOTOS)]
    sets["pixel-art domain"] = pixel_art_scenes(8, seed=999)
    return sets


def bicubic(lr: Image.Image) -> Image.Image:
    return lr.resize((lr.width * SCALE, lr.height * SCALE), Image.Resampling.BICUBIC)


Upscaler = Callable[[Image.Image], Image.Image]


def time_per_megapixel(functions: dict[str, Upscaler], lr: Image.Image, rounds: int) -> dict[str, float]:
    """Seconds per output megapixel, median over rounds that run every function once in turn (same load for all)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    megapixels = lr.width * lr.height * SCALE * SCALE / 1e6
    for name, fn in functions.items():  # warm-up
        fn(lr)
    for _ in range(rounds):
        for name, fn in functions.items():
            started = time.perf_counter()
            fn(lr)
            times[name].append((time.perf_counter() - started) / megapixels)
    return {name: float(np.median(v)) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="DSCLoRA fine-tuning steps per variant")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sr"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from core.image_metrics import sr_scores
    from models.span import num_parameters
    from pipelines.upscale import default_sr_model_path, load_sr_model, upscale_image
    from trainers.dsclora import DscLoraConfig, attach_conv_lora, train_dsclora

    work = Path(tempfile.mkdtemp(prefix="atelier-sr-bench-"))
    sets = evaluation_sets(work)
    models: dict[str, tuple[Path, bool]] = {}
    if default_sr_model_path().is_file():
        models["shipped SPAN (from scratch)"] = (default_sr_model_path(), False)
    if DSCF.is_file():
        models["official DSCF weights"] = (DSCF, True)
    if not models:
        raise SystemExit("no SR model to measure: neither the shipped default nor ../shared's reference weights")
    start_name = "official DSCF weights" if DSCF.is_file() else "shipped SPAN (from scratch)"
    start, start_pth = models[start_name]

    train_dir = work / "domain-train"
    train_dir.mkdir()
    for i, image in enumerate(pixel_art_scenes(16, seed=11)):
        image.save(train_dir / f"{i:02d}.png")
    fine_tunes = {}
    for label, weight in (("DSCLoRA (with affinity loss)", DscLoraConfig.lambda_affinity),
                          ("DSCLoRA (without affinity loss)", 0.0)):
        out = work / f"dsclora-{weight}.safetensors"
        started = time.time()
        torch.manual_seed(0)
        train_dsclora(DscLoraConfig(hr_folder=str(train_dir), out=str(out), base=str(start), official_pth=start_pth,
                                    steps=args.steps, lambda_affinity=weight), work / f"run-{weight}")
        fine_tunes[label] = {"seconds": round(time.time() - started, 1), "lambda_affinity": weight}
        models[label] = (out, False)

    def row(label: str, upscale, parameters: int) -> dict:
        cells = {}
        for name, images in sets.items():
            psnr, ssim = sr_scores(upscale, images, SCALE)
            cells[name] = {"psnr": round(psnr, 3), "ssim": round(ssim, 4)}
        return {"model": label, "parameters": parameters, **cells}

    rows, loaded = [row("bicubic", bicubic, 0)], {}
    for label, (path, pth) in models.items():
        model = loaded[label] = load_sr_model(path, allow_pth=pth)
        rows.append(row(label, lambda lr, m=model: upscale_image(m, lr, tile=0), num_parameters(model.network)))
        if label in fine_tunes:
            rows[-1]["fine_tune"] = {**fine_tunes[label], "start": start_name, "steps": args.steps}

    # Speed: merged (what ships) vs the same network with its ConvLoRA branches still attached, vs bicubic.
    reference = loaded[start_name]
    unmerged = copy.deepcopy(reference)
    attach_conv_lora(unmerged.network, DscLoraConfig(hr_folder="", out="x.safetensors"))
    photo = sets["held-out photos"][0]
    lr = photo.resize((photo.width // SCALE, photo.height // SCALE), Image.Resampling.BICUBIC).crop((0, 0, 128, 128))
    functions = {"bicubic": bicubic,
                 "SPAN (merged)": lambda x: upscale_image(reference, x, tile=0),
                 "SPAN + ConvLoRA (unmerged)": lambda x: upscale_image(unmerged, x, tile=0)}
    with torch.no_grad():
        seconds = time_per_megapixel(functions, lr, args.rounds)
    speed = {name: {"seconds_per_megapixel": round(v, 4), "vs_bicubic": round(v / seconds["bicubic"], 1),
                    "vs_unmerged": round(v / seconds["SPAN + ConvLoRA (unmerged)"], 3)}
             for name, v in seconds.items()}

    result = {"scale": SCALE, "protocol": "Y channel (BT.601), 4-px border shaved, HR cropped to a multiple of 4, "
                                          "LR = Pillow bicubic", "sets": {k: len(v) for k, v in sets.items()},
              "rows": rows, "speed": speed, "speed_input": f"{lr.width}x{lr.height} LR -> x{SCALE}",
              "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    names = list(result["sets"])
    lines = [f"# Super-resolution ×{result['scale']} ({result['date']}, {result['threads']} CPU thread(s))", "",
             f"PSNR (dB) / SSIM, {result['protocol']}. Images per set: "
             + ", ".join(f"{k} {v}" for k, v in result["sets"].items()) + ".", "",
             "| model | parameters | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for row in result["rows"]:
        cells = [f"{row[n]['psnr']:.2f} / {row[n]['ssim']:.4f}" for n in names]
        lines.append(f"| {row['model']} | {row['parameters']:,} | " + " | ".join(cells) + " |")
    lines += ["", f"Speed on a {result['speed_input']} input (median of interleaved rounds):", "",
              "| network | s / output MP | × bicubic | × unmerged |", "|---|---:|---:|---:|"]
    for name, s in result["speed"].items():
        lines.append(f"| {name} | {s['seconds_per_megapixel']:.3f} | {s['vs_bicubic']} | {s['vs_unmerged']} |")
    tunes = [r for r in result["rows"] if "fine_tune" in r]
    if tunes:
        t = tunes[0]["fine_tune"]
        lines += ["", f"Fine-tunes: {t['steps']} steps from {t['start']} on 16 pixel-art scenes "
                      f"(evaluated on 8 others); " + ", ".join(f"{r['model']}: {r['fine_tune']['seconds']} s"
                                                              for r in tunes) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
