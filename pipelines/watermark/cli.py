"""``launch.py watermark ...``: train an extractor or a watermark LoRA, merge it, verify images, name the key."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


TRAIN_HELP = "train a watermark LoRA on the VAE decoder for your key"
TRAIN_DESCRIPTION = ("Train the watermark LoRA (decoder up-block convs) so every decoded image carries the key; the "
                     "loss weights follow the dynamic scheduler, logged each step in the run folder's events.jsonl. "
                     "A stopped run saves the adapter as far as it got and cannot be resumed: start a new run.")


def add_train_options(train: argparse.ArgumentParser) -> None:
    """The options of ``watermark train`` and of its alias ``train watermark`` (what the Train tab's jobs run)."""
    train.add_argument("--out", required=True, help="the adapter .safetensors file")
    train.add_argument("--key", help="hex key (default: a fresh random one, printed)")
    train.add_argument("--secret", action="store_true", help="do not store the key in the file's metadata")
    train.add_argument("--model", help="base model (default: the embedded model)")
    train.add_argument("--extractor", help="extractor file (default: the shipped one)")
    train.add_argument("--images", help="folder of images whose latents to train on (default: samples of the model)")
    train.add_argument("--latents", type=int, default=64)
    train.add_argument("--rank", type=int, default=4)
    train.add_argument("--alpha", type=float, default=32.0)
    train.add_argument("--steps", type=int, default=1500, help="maximum steps (training stops early on its targets)")
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--noise", type=float, default=0.0, help="share of steps trained through the noise layer")
    train.add_argument("--mode", choices=("lora", "full_decoder"), default="lora",
                       help="lora (default): the watermark LoRA; full_decoder: fine-tune every decoder weight "
                            "(the Stable Signature baseline; writes the decoder's state, not an adapter)")
    train.add_argument("--run-dir", help="run folder (default: next to --out)")
    train.add_argument("--device", default="auto")


def register(subparsers) -> None:
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

    train = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_DESCRIPTION)
    add_train_options(train)
    train.set_defaults(func=handle_train)

    merge = sub.add_parser("merge", help="write a pipeline folder whose VAE decoder has the watermark merged in")
    merge.add_argument("adapter", metavar="ADAPTER.safetensors")
    merge.add_argument("--model", help="base model (default: the embedded model)")
    merge.add_argument("--out", required=True, help="new pipeline folder (must not exist or be empty)")
    merge.set_defaults(func=handle_merge)

    extractor = sub.add_parser("train-extractor", help="train your own bit extractor (HiDDeN-style, noise layer)")
    extractor.add_argument("--out", required=True)
    extractor.add_argument("--bits", type=int, default=48)
    extractor.add_argument("--steps", type=int, default=3000)
    extractor.add_argument("--images", help="folder of your images (default: micro-world scenes + bundled photos)")
    extractor.add_argument("--seed", type=int, default=0)
    extractor.set_defaults(func=handle_train_extractor)


def _extractor_and_key(args: argparse.Namespace):
    from .verify import KeySource, key_from_adapter, open_extractor

    source = key_from_adapter(Path(args.adapter)) if getattr(args, "adapter", None) else KeySource(args.key, None)
    return open_extractor(args.extractor, source.extractor_hash), source.key


def handle_verify(args: argparse.Namespace) -> int:
    from .verify import load_image, verify

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
    from .verify import key_list

    path = Path(text)
    return key_list(path.read_text(encoding="utf-8", errors="replace") if path.is_file() else text)


def handle_identify(args: argparse.Namespace) -> int:
    from .verify import identify, load_image, open_extractor

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
    from .verify import load_image, open_extractor, robustness

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


def handle_train(args: argparse.Namespace) -> int:
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    if args.key is not None:
        from pipelines.errors import UserError

        from .keys import parse_key
        from .verify import open_extractor

        # An unset shell variable (--key "$KEY") must not silently give a fresh random key the owner never sees.
        if not args.key.strip():
            raise UserError("--key is empty; give your hex key, or leave --key out for a fresh random one")
        parse_key(args.key, open_extractor(args.extractor).config.bits)  # a bad key is refused before the model loads
    out = Path(args.out)
    config = WatermarkConfig(out=str(out), model=args.model, key=args.key, keep_key_secret=args.secret,
                             extractor=args.extractor, images=args.images, latents=args.latents, rank=args.rank,
                             alpha=args.alpha, max_steps=args.steps, lr=args.lr, noise_probability=args.noise,
                             device=args.device, mode=args.mode)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.stem + "-run")
    try:
        run = train_watermark(config, run_dir)
    except Exception as exc:  # the run folder says why it ended (the Train tab shows "error" and this message)
        from pipelines.errors import UserError
        from trainers.events import EventLog

        if run_dir.is_dir():  # not made for a refused --out
            EventLog(run_dir).write("error", message=str(exc) if isinstance(exc, UserError)
                                    else f"{exc.__class__.__name__}: {exc}")
        raise
    last = run.history[-1] if run.history else {}
    print(json.dumps({"artifact": run.result.artifact, "key": run.key, "steps": run.result.step,
                      "bit_accuracy": last.get("bit_accuracy"), "psnr": last.get("psnr"),
                      "seconds_to_99": run.seconds_to_99, "key_stored": not args.secret}))
    return 0


def handle_merge(args: argparse.Namespace) -> int:
    from .merge import merge_into_folder

    folder = merge_into_folder(Path(args.adapter), Path(args.out), model=args.model)
    print(f"watermarked pipeline written to {folder}")
    return 0


def handle_train_extractor(args: argparse.Namespace) -> int:
    from trainers.watermark_extractor import ExtractorTrainConfig, train_extractor

    summary = train_extractor(ExtractorTrainConfig(out=args.out, bits=args.bits, steps=args.steps,
                                                   folder=args.images, seed=args.seed),
                              log=lambda entry: print(json.dumps(entry), flush=True))
    print(json.dumps({"extractor": args.out, "hash": summary["hash"], "seconds": summary["seconds"]}))
    return 0
