"""``launch.py compose --spec FILE.json --out FILE.png``: a LoRA-Composer composition, headless."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from core.errors import UserError

# `launch.py --help` imports this module to register the command; the handlers import the work (torch and the
# models behind it) when they run, so the help stays instant.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compose", help="several concept LoRAs in one image, each in its own box (LoRA-Composer)",
        description="Generate one image from a composition file (what the Compose tab saves): a global prompt and "
                    "concepts, each a LoRA file, a box (normalised x0,y0,x1,y1), a region prompt and a strength.")
    parser.add_argument("--spec", required=True, metavar="FILE.json", help="the composition")
    parser.add_argument("--out", required=True, metavar="FILE.png")
    parser.add_argument("--seed", type=int, help="override the composition's seed")
    parser.add_argument("--overlay", metavar="FILE.png", help="also save the image with the boxes drawn")
    parser.add_argument("--model", help="override the composition's base model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default: fp16 on CUDA, else fp32)")
    parser.add_argument("--attention", default="auto", help="auto, sdpa, xformers, default (default: auto)")
    parser.set_defaults(func=handle_compose)


def handle_compose(args: argparse.Namespace) -> int:
    from pipelines.composition import read_composition
    from models.loading import load_model
    from pipelines.lora_composer import box_overlay, compose, save_composition
    from core.safetensors_files import check_safetensors_file

    out = Path(args.out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise UserError(f"--out must name a .png file (got {args.out})")
    if args.overlay and Path(args.overlay).suffix.lower() != ".png":
        raise UserError(f"--overlay must name a .png file (got {args.overlay})")
    spec = read_composition(Path(args.spec))
    if args.seed is not None:
        if not 0 <= args.seed <= 2**32 - 1:
            raise UserError(f"--seed must be between 0 and {2**32 - 1}")
        spec = replace(spec, seed=args.seed)
    for concept in spec.concepts:
        if not Path(concept.lora).is_file():
            raise UserError(f"LoRA file not found: {concept.lora}")
        check_safetensors_file(Path(concept.lora))  # empty, truncated or renamed files: refused before the model loads
    model = load_model(args.model or spec.base_model, device=args.device, dtype=args.dtype, attention=args.attention)

    def progress(step: int, total: int) -> None:
        print(f"\rstep {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    result = compose(model, spec, on_step=progress)
    save_composition(result, spec, model, out)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.overlay:
        box_overlay(result.image, [c.box for c in spec.concepts],
                    [Path(c.lora).stem for c in spec.concepts]).save(args.overlay)
    print(f"{out} seed={result.seed} concepts={len(spec.concepts)} model={model.name} "
          f"[{model.runtime.describe()}] {result.seconds:.1f}s")
    return 0
