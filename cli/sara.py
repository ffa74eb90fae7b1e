"""``launch.py sara info|merge|extract``: what to do with a trained SaRA delta besides generating with it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import UserError

# `launch.py --help` imports this module to register the command; the handlers import the work (torch and the
# models behind it) when they run, so the help stays instant.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sara", help="inspect, merge or convert SaRA sparse deltas",
        description="SaRA deltas (from `launch.py train sara`): show what a file holds, merge deltas into a full "
                    "diffusers pipeline folder, or extract a standard LoRA that other tools load.")
    sub = parser.add_subparsers(dest="sara_command", metavar="SUBCOMMAND", required=True)

    info = sub.add_parser("info", help="what a SaRA file changes and which base model it belongs to")
    info.add_argument("file", metavar="FILE.safetensors")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=handle_info)

    merge = sub.add_parser("merge", help="write a pipeline folder with deltas merged (W = P₀ + Σ strength·Δ)",
                           description="Merge one or more SaRA deltas, each with a strength, into the base model "
                                       "and save a full diffusers pipeline folder.")
    merge.add_argument("deltas", nargs="+", metavar="FILE[:STRENGTH]")
    merge.add_argument("--out", required=True, help="new pipeline folder (must not exist or be empty)")
    merge.add_argument("--model", help="base model (default: the embedded model)")
    merge.set_defaults(func=handle_merge)

    extract = sub.add_parser("extract", help="a rank-r LoRA from a delta (truncated SVD per layer)",
                             description="Extract a rank-r LoRA from a SaRA delta; prints the relative "
                                         "reconstruction error ‖Δ − Δᵣ‖/‖Δ‖ of every layer.")
    extract.add_argument("file", metavar="FILE.safetensors")
    extract.add_argument("--rank", type=int, default=16)
    extract.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    extract.add_argument("--out", required=True, help="the LoRA .safetensors file")
    extract.add_argument("--json", action="store_true", help="print the per-layer errors as JSON")
    extract.set_defaults(func=handle_extract)


def handle_info(args: argparse.Namespace) -> int:
    from adapters.sara.files import load_sparse_delta

    delta = load_sparse_delta(Path(args.file))
    meta = delta.metadata
    report = {"file": str(args.file), "entries": delta.count, "tensors": len(delta.tensors),
              "threshold": float(meta.get("atelier.sara_threshold", "nan")), "budget": meta.get("atelier.sara_budget"),
              "base_fingerprint": delta.base_fingerprint, "base_family": delta.base_family,
              "trigger_words": meta.get("atelier.trigger_words", "")}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def handle_merge(args: argparse.Namespace) -> int:
    from pipelines.generation import parse_lora_arg
    from adapters.sara.files import merge_into_folder

    deltas = [parse_lora_arg(text) for text in args.deltas]
    out = merge_into_folder(args.model, [(Path(p), s) for p, s in deltas], Path(args.out))
    print(f"merged {len(deltas)} delta(s) into {out}")
    return 0


def handle_extract(args: argparse.Namespace) -> int:
    from adapters.lora.files import save_lora
    from adapters.sara.files import extract_lora, load_sparse_delta

    if not str(args.out).endswith(".safetensors"):
        raise UserError("--out must name a .safetensors file")
    adapter, report = extract_lora(load_sparse_delta(Path(args.file)), args.rank)
    save_lora(adapter, Path(args.out), format=args.format)
    if args.json:
        print(json.dumps({"out": str(args.out), "rank": args.rank, "format": args.format,
                          "mean_relative_error": report.mean_error, "layers": report.layers,
                          "skipped": report.skipped}))
    else:
        for name, error in report.layers.items():
            print(f"{error:8.4f}  {name}")
        print(f"rank {args.rank} LoRA ({args.format}) written to {args.out}; {len(report.layers)} layers, "
              f"mean relative error {report.mean_error:.4f}")
    return 0
