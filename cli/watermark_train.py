"""``launch.py watermark train`` / ``train watermark`` and ``watermark train-extractor``: the watermark's training
commands. They join the ``watermark`` group that :mod:`cli.watermark` makes; ``train watermark`` (what the Train
tab's jobs run) is the same command, its flags generated from :class:`trainers.watermark_config.WatermarkConfig`."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from core.errors import UserError
from core.option_fields import add_cli_options, option_fields, options_from_args
from trainers.watermark_config import WatermarkConfig

TRAIN_HELP = "train a watermark LoRA on the VAE decoder for your key"
TRAIN_DESCRIPTION = ("Train the watermark LoRA (decoder up-block convs) so every decoded image carries the key; the "
                     "loss weights follow the dynamic scheduler, logged each step in the run folder's events.jsonl. "
                     "A stopped run saves the adapter as far as it got and a checkpoint: continue it with "
                     "--resume RUN_DIR.")


TRAIN_FIELDS = option_fields(WatermarkConfig)  # the flags, generated from the settings' declarations


def add_train_options(train: argparse.ArgumentParser) -> None:
    """The options of ``watermark train`` and of its alias ``train watermark`` (what the Train tab's jobs run)."""
    add_cli_options(train, TRAIN_FIELDS)
    train.add_argument("--run-dir", help="run folder (default: next to --out)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a stopped or interrupted run exactly, with its saved settings and key")


def register(subparsers) -> None:
    """``watermark`` (made by cli.watermark) with its training sub-commands."""
    from cli.watermark import register as register_watermark

    sub = register_watermark(subparsers)
    train = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_DESCRIPTION)
    add_train_options(train)
    train.set_defaults(func=handle_train)

    extractor = sub.add_parser("train-extractor", help="train your own bit extractor (HiDDeN-style, noise layer)",
                               description="Train a bit extractor and its encoder under the noise layer. The run "
                                           "folder holds events and checkpoints: stop with Ctrl-C or a STOP file, "
                                           "continue with --resume RUN_DIR.")
    extractor.add_argument("--out", help="the extractor .safetensors file (required unless --resume)")
    extractor.add_argument("--bits", type=int, default=48)
    extractor.add_argument("--steps", type=int, default=3000)
    extractor.add_argument("--images", help="folder of your images (default: micro-world scenes + bundled photos)")
    extractor.add_argument("--seed", type=int, default=0)
    extractor.add_argument("--run-dir", help="run folder (default: next to --out)")
    extractor.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or interrupted run exactly")
    extractor.set_defaults(func=handle_train_extractor)


def _config(args: argparse.Namespace):
    """The run's settings: a resumed run's own (its key among them), or the command line's."""
    if args.resume:
        try:
            saved = json.loads((Path(args.resume) / "config.json").read_text(encoding="utf-8"))
            names = {f.name for f in fields(WatermarkConfig)}
            config = WatermarkConfig(**{k: v for k, v in saved.items() if k in names})
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{args.resume}: not a watermark run folder ({exc})") from exc
        config.prompts = tuple(config.prompts)
        if args.device is not None:
            config.device = args.device
        return config
    given = options_from_args(args, TRAIN_FIELDS)
    if not given.get("out"):
        raise UserError("--out is required (or --resume RUN_DIR)")
    if args.key is not None:
        from pipelines.watermark.keys import parse_key
        from pipelines.watermark.verify import open_extractor

        # An unset shell variable (--key "$KEY") must not silently give a fresh random key the owner never sees.
        if not args.key.strip():
            raise UserError("--key is empty; give your hex key, or leave --key out for a fresh random one")
        parse_key(args.key, open_extractor(args.extractor).config.bits)  # a bad key is refused before the model loads
    return WatermarkConfig(**{**given, "out": str(Path(given["out"]))})


def handle_train(args: argparse.Namespace) -> int:
    from trainers import watermark_lora
    from trainers.checkpoints import latest_checkpoint
    from trainers.events import EventLog

    config = _config(args)
    out = Path(config.out)
    run_dir = Path(args.resume or args.run_dir or out.with_name(out.stem + "-run"))
    if not args.resume and latest_checkpoint(run_dir / "checkpoints") is not None:
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    try:
        run = watermark_lora.train_watermark(config, run_dir, resume=bool(args.resume))
    except Exception as exc:  # the run folder says why it ended (the Train tab shows "error" and this message)
        if run_dir.is_dir():  # not made for a refused --out
            EventLog(run_dir).write("error", message=str(exc) if isinstance(exc, UserError)
                                    else f"{exc.__class__.__name__}: {exc}")
        raise
    if run.result.status == "stopped":
        print(f"stopped at step {run.result.step}; continue with: python launch.py watermark train --resume {run_dir}",
              flush=True)
    last = run.history[-1] if run.history else {}
    print(json.dumps({"artifact": run.result.artifact, "key": run.key, "steps": run.result.step,
                      "status": run.result.label, "warnings": run.result.warnings, "bit_accuracy": last.get("bit_accuracy"), "psnr": last.get("psnr"),
                      "seconds_to_99": run.seconds_to_99, "key_stored": not config.keep_key_secret}))
    return 0


def handle_train_extractor(args: argparse.Namespace) -> int:
    from trainers.watermark_extractor import ExtractorTrainConfig, default_run_dir, train_extractor

    if args.resume:
        try:
            saved = json.loads((Path(args.resume) / "config.json").read_text(encoding="utf-8"))
            config = ExtractorTrainConfig(**{**saved, "sizes": tuple(saved["sizes"])})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{args.resume}: not an extractor run folder ({exc})") from exc
    elif not args.out:
        raise UserError("--out is required (or --resume RUN_DIR)")
    else:
        config = ExtractorTrainConfig(out=args.out, bits=args.bits, steps=args.steps, folder=args.images,
                                      seed=args.seed)
    run_dir = Path(args.resume or args.run_dir or default_run_dir(config))
    summary = train_extractor(config, log=lambda entry: print(json.dumps(entry), flush=True), run_dir=run_dir,
                              resume=bool(args.resume))
    if summary["status"] == "stopped":
        print(f"stopped at step {summary['steps']}; continue with: python launch.py watermark train-extractor "
              f"--resume {run_dir}", flush=True)
    print(json.dumps({"extractor": config.out, "hash": summary["hash"], "seconds": summary["seconds"],
                      "status": summary["status"]}))
    return 0
