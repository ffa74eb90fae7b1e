"""``launch.py watermark ...``: merge a watermark, verify images, name the key. The training commands (``watermark
train``, ``watermark train-extractor``) are added to this group by :mod:`cli.watermark_train`: pipelines never
import trainers."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> argparse._SubParsersAction:
    """Add ``watermark`` and its sub-commands; returns them so the training commands can join the group."""
    parser = subparsers.add_parser(
        "watermark", help="watermark a model's VAE decoder with your key, and verify images",
        description="Watermark LoRA: every image the model decodes carries your key; verification reports matched "
                    "bits, an exact binomial p-value and a verdict at the false-positive rate you choose.")
    sub = parser.add_subparsers(dest="watermark_command", metavar="SUBCOMMAND", required=True)

    verify = sub.add_parser("verify", help="does each image (and all of them together) carry the key?")
    verify.add_argument("images", nargs="+", metavar="IMAGE")
    source = verify.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", help="the key in hex")
    source.add_argument("--adapter", help="a watermark adapter file whose metadata holds the key")
    verify.add_argument("--extractor", help="extractor file (default: the shipped one)")
    verify.add_argument("--fpr", type=float, default=1e-6, help="false-positive rate of the verdict (default 1e-6)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=handle_verify)

    identify = sub.add_parser("identify", help="which of several registered keys does an image carry?")
    identify.add_argument("images", nargs="+", metavar="IMAGE")
    identify.add_argument("--keys", required=True, help="comma-separated hex keys, or a text file with one per line")
    identify.add_argument("--extractor")
    identify.add_argument("--fpr", type=float, default=1e-6)
    identify.add_argument("--json", action="store_true")
    identify.set_defaults(func=handle_identify)

    robust = sub.add_parser("robustness", help="bit accuracy of an image under standard edits (JPEG, crop, ...)")
    robust.add_argument("image", metavar="IMAGE")
    robust.add_argument("--key", required=True)
    robust.add_argument("--extractor")
    robust.add_argument("--fpr", type=float, default=1e-6)
    robust.add_argument("--json", action="store_true")
    robust.set_defaults(func=handle_robustness)

    merge = sub.add_parser("merge", help="write a pipeline folder whose VAE decoder has the watermark merged in")
    merge.add_argument("adapter", metavar="ADAPTER.safetensors")
    merge.add_argument("--model", help="base model (default: the embedded model)")
    merge.add_argument("--out", required=True, help="new pipeline folder (must not exist or be empty)")
    merge.set_defaults(func=handle_merge)

    return sub


def _extractor_and_key(args: argparse.Namespace):
    from pipelines.watermark.verify import KeySource, key_from_adapter, open_extractor

    source = key_from_adapter(Path(args.adapter)) if getattr(args, "adapter", None) else KeySource(args.key, None)
    return open_extractor(args.extractor, source.extractor_hash), source.key


def handle_verify(args: argparse.Namespace) -> int:
    from pipelines.watermark.verify import load_image, verify

    extractor, key = _extractor_and_key(args)
    images = [(str(p), load_image(p)) for p in args.images]
    report = verify(images, key, extractor, args.fpr)
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for name, v in report.per_image:
            print(f"{name}: {v.matched}/{v.bits} bits ({v.bit_accuracy:.1%}), p = {v.p_value:.3g} → "
                  f"{'WATERMARKED' if v.watermarked else 'not detected'} at FPR {args.fpr:g} (needs ≥ {v.threshold})")
        if report.pooled:
            v = report.pooled
            print(f"pooled over {len(report.per_image)} images: {v.matched}/{v.bits} bits, p = {v.p_value:.3g} → "
                  f"{'WATERMARKED' if v.watermarked else 'not detected'}")
    return 0


def _read_keys(text: str) -> list[str]:
    from pipelines.watermark.verify import key_list

    path = Path(text)
    return key_list(path.read_text(encoding="utf-8", errors="replace") if path.is_file() else text)


def handle_identify(args: argparse.Namespace) -> int:
    from pipelines.watermark.verify import identify, load_image, open_extractor

    extractor = open_extractor(args.extractor)
    keys = _read_keys(args.keys)
    results = []
    for p in args.images:
        match = identify(load_image(p), keys, extractor, args.fpr)
        results.append({"image": str(p), "best_key": keys[match.index], **match.verdict.as_dict(),
                        "adjusted_p_value": match.adjusted_p, "keys": match.keys,
                        "correction": f"Bonferroni over {match.keys} keys (each tested at FPR/{match.keys})"})
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            named = r["best_key"] if r["watermarked"] else "none of the keys"
            print(f"{r['image']}: {named} ({r['matched']}/{r['bits']} bits, adjusted p = {r['adjusted_p_value']:.3g}; "
                  f"{r['correction']})")
    return 0


def handle_robustness(args: argparse.Namespace) -> int:
    from pipelines.watermark.verify import load_image, open_extractor, robustness

    extractor = open_extractor(args.extractor)
    rows = robustness(load_image(args.image), args.key, extractor, args.fpr)
    if args.json:
        print(json.dumps(rows))
    else:
        print("| attack | bits matched | bit accuracy | p-value | detected |")
        print("|---|---:|---:|---:|---|")
        for r in rows:
            print(f"| {r['attack']} | {r['matched']}/{r['bits']} | {r['bit_accuracy']:.1%} | {r['p_value']:.2g} | "
                  f"{'yes' if r['watermarked'] else 'no'} |")
    return 0


def handle_merge(args: argparse.Namespace) -> int:
    from pipelines.watermark.merge import merge_into_folder

    folder = merge_into_folder(Path(args.adapter), Path(args.out), model=args.model)
    print(f"watermarked pipeline written to {folder}")
    return 0
