"""``python launch.py train METHOD ...``: the command the CLI user types and the Train tab launches."""
from __future__ import annotations

import argparse
import time
from dataclasses import fields, replace
from pathlib import Path

from cli.watermark_train import TRAIN_DESCRIPTION, add_train_options, handle_train
from core.errors import UserError
from core.option_fields import add_cli_options, options_from_args
from core.paths import data_home
from trainers.presets import find_preset
from trainers.registry import make_method, training_methods
from trainers.run_targets import done_line


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="folder of images with same-name .txt captions")
    p.add_argument("--out", help="the trained adapter, a .safetensors file")
    p.add_argument("--model", help="base model (default: the embedded model)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's, else 500)")
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's, else LoRA 1e-4; SaRA 1e-3·exp(−350·θ))")
    p.add_argument("--trigger", help="trigger word, prepended to every caption that lacks it")
    p.add_argument("--caption", help="one caption for every image (instead of .txt files)")
    p.add_argument("--repeats", type=int, help="times each image is seen per epoch (default 1)")
    p.add_argument("--batch-size", type=int, help="global batch size (default: the preset's, else 1)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the model's native size)")
    p.add_argument("--buckets", action="store_true", default=None, help="aspect-ratio buckets instead of centre crops")
    p.add_argument("--lr-scheduler", help="constant, constant_with_warmup, linear, cosine, ... (default constant)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--mixed-precision", help="auto, no, fp16, bf16 (default auto: fp16/bf16 on CUDA, none on CPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--noise-offset", type=float)
    p.add_argument("--caption-dropout", type=float,
                   help="share of captions replaced by an empty one (e.g. 0.1; default 0)")
    p.add_argument("--min-snr-gamma", type=float, help="min-SNR loss weighting γ (e.g. 5; default off)")
    p.add_argument("--latent-sample", action="store_true", default=None,
                   help="train on samples of the VAE posterior instead of its mean")
    p.add_argument("--prior-data", help="prior-preservation folder: images + captions of what the model should keep "
                                        "drawing (captions used as written; DreamBooth-style)")
    p.add_argument("--prior-weight", type=float, help="weight of the prior-preservation loss (default 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: the preset's, else 100)")
    p.add_argument("--sample-every", type=int, help="steps between preview samples (default: only at the end)")
    p.add_argument("--sample-prompt", action="append", dest="sample_prompts", help="preview prompt (repeatable)")
    p.add_argument("--sample-steps", type=int)
    p.add_argument("--validation-data", help="folder of validation images + captions: a validation loss at fixed "
                                             "noise and timesteps at every checkpoint and at the end")
    p.add_argument("--validation-split", type=float,
                   help="instead: this share of the training images held out for the validation loss (e.g. 0.1)")
    p.add_argument("--device", help="auto, cpu, cuda, mps")
    p.add_argument("--preset", help="settings to start from, overridden by the flags given here: auto (default: the "
                                    "shipped preset of the model's family — micro, sd1, sd2, sdxl), a preset's "
                                    "name (shipped or saved in the Train tab), none (the bare defaults), or an "
                                    "earlier run's config.json")
    p.add_argument("--run-dir", help="run folder (default: a new folder under <data folder>/runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or interrupted run from its last checkpoint")
    p.add_argument("--extend", type=int, metavar="N",
                   help="with --resume: N more steps than the run was set to (also on a finished run; the result "
                        "equals one run that long; 0 draws the previews again and saves the file)")


def register(subparsers) -> None:
    """``train METHOD``: one sub-command per registered method, its options generated from its options dataclass."""
    train = subparsers.add_parser("train", help="train an adapter (a job with a run folder you can stop and resume)",
                                  description="Train an adapter. Each run has a folder with its config, events, "
                                              "samples and checkpoints; stop with Ctrl-C (a checkpoint is saved) "
                                              "and continue with --resume RUN_DIR.")
    methods = train.add_subparsers(dest="method", metavar="METHOD", required=True)
    for spec in training_methods().values():
        parser = methods.add_parser(spec.name, help=spec.help,
                                    description=spec.description.replace("%", "%%") or TRAIN_DESCRIPTION)
        if spec.runner == "sr":
            fields = spec.option_fields()
            add_cli_options(parser, fields)
            parser.add_argument("--run-dir")
            parser.add_argument("--resume", metavar="RUN_DIR")
            parser.set_defaults(func=run_train_sr, option_fields=fields)
            continue
        if spec.runner == "watermark":
            # The same command as `watermark train` (one set of options, one handler), named here so the Train
            # tab's job queue, which runs `launch.py train METHOD`, can run it too.
            add_train_options(parser)
            parser.set_defaults(func=handle_train)
            continue
        add_common_options(parser)
        fields = spec.option_fields()
        add_cli_options(parser, fields)
        parser.set_defaults(func=run_train, option_fields=fields)
        if spec.runner == "b4m":
            add_b4m_sources(parser, spec.name)
            parser.set_defaults(func=run_train_b4m)


def add_b4m_sources(p: argparse.ArgumentParser, method: str) -> None:
    """Break-for-Make's folders: stage 1's auxiliary images, stage 2's content and style data and triggers."""
    if method == "b4m-combine":
        p.add_argument("--content-data", help="the content images (default: --data)")
        p.add_argument("--style-data", help="the style images")
        p.add_argument("--content-trigger", help="default: the content file's trigger")
        p.add_argument("--style-trigger", help="default: the style file's trigger")
        return
    other = "styles" if method == "b4m-content" else "contents"
    p.add_argument("--aux", dest="prior_data", help=f"folder of auxiliary {other} (images + captions)")
    p.add_argument("--aux-prompt", action="append", dest="aux_prompts",
                   help="class prompt for auxiliary images drawn by the base model (repeatable)")
    p.add_argument("--aux-count", type=int, default=8, help="images per --aux-prompt (default 8)")
    p.add_argument("--aux-microworld", type=int, metavar="N",
                   help="N base-set scenes from the micro world's scene generator (micro model only)")
    p.set_defaults(aux_role=other)


def config_from_args(args: argparse.Namespace):
    from trainers.loop import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    if args.resume:
        base = TrainConfig.load(Path(args.resume) / "config.json")
    elif args.preset and (args.preset.endswith(".json") or Path(args.preset).expanduser().is_file()):
        base = TrainConfig.load(Path(args.preset))
    else:
        if not args.data or not args.out:
            raise UserError("--data and --out are required (or --resume RUN_DIR, or --preset CONFIG)")
        base = TrainConfig(data=args.data, out=args.out, method=args.method)
        from models.loading import source_family  # deferred: loads torch, which --help must not

        preset = find_preset(data_home(), args.method, {f.name for f in args.option_fields},
                             source_family(args.model), args.preset or "auto")
        if preset is not None:
            base = replace(base, **preset.settings, method_options=dict(preset.options))
            print(preset.describe(), flush=True)
    values = {k: v for k, v in vars(args).items() if k in names and v is not None and k != "method"}
    if getattr(args, "extend", None) is not None:
        if not args.resume:
            raise UserError("--extend N continues a run: give it with --resume RUN_DIR")
        if args.extend < 0 or args.steps is not None:
            raise UserError("--extend takes a number of steps ≥ 0, instead of --steps")
        values["steps"] = base.steps + args.extend
    options = {**base.method_options, **options_from_args(args, args.option_fields)}
    config = TrainConfig(**{**base.__dict__, **values, "method": args.method, "method_options": options})
    if config.method != args.method:
        raise UserError(f"this run is a {config.method} run, not {args.method}")
    return config.validate()


def default_run_dir_for(method: str, out: str) -> Path:
    return data_home() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-{Path(out).stem}"


def run_train_b4m(args: argparse.Namespace) -> int:
    """Break-for-Make's extras before the shared path: auxiliary images to draw, stage 2's folders and triggers."""
    if args.resume:
        return run_train(args)
    if args.method == "b4m-combine":
        from models.loading import unet_layout
        from trainers.break_for_make import check_combinable, read_plp_file

        if not args.content or not args.style:
            raise UserError("--content and --style (the two stage-1 files) are required")
        layout = unet_layout(args.model)  # a kohya file's SDXL names are read by the model's own block layout
        content, style = read_plp_file(args.content, layout), read_plp_file(args.style, layout)
        check_combinable(content, style)
        args.data = args.content_data or args.data
        args.prior_data = args.style_data
        if not args.prior_data:
            raise UserError("--style-data (the style images) is required")
        args.trigger = args.content_trigger or args.trigger or content.content_trigger or None
        args.prior_trigger = args.style_trigger or style.style_trigger or None
        return run_train(args)
    sources = [bool(args.prior_data), bool(args.aux_prompts), args.aux_microworld is not None]
    if sum(sources) > 1:
        raise UserError("choose one source of auxiliary images: --aux, --aux-prompt or --aux-microworld")
    if not args.data or not args.out:
        raise UserError("--data and --out are required (or --resume RUN_DIR, or --preset CONFIG)")
    args.run_dir = str(Path(args.run_dir or default_run_dir_for(args.method, args.out)).expanduser().resolve())
    aux_dir = Path(args.run_dir) / "aux"
    if args.aux_microworld is not None:
        from trainers.aux_sets import microworld_aux

        args.prior_data = str(microworld_aux(aux_dir, args.aux_microworld, seed=args.seed or 0, model=args.model))
        print(f"auxiliary {args.aux_role}: {args.aux_microworld} micro-world base-set images in {aux_dir}", flush=True)
    elif args.aux_prompts:
        from models.loading import load_model
        from trainers.aux_sets import generate_class_images

        model = load_model(args.model, device=args.device or "auto")
        model.pipe.set_progress_bar_config(disable=True)
        print(f"drawing {len(args.aux_prompts) * args.aux_count} auxiliary images with the base model ...", flush=True)
        args.prior_data = str(generate_class_images(model, args.aux_prompts, args.aux_count, aux_dir,
                                                    seed=args.seed or 0))
        del model
    return run_train(args)


def warn_dataset(config, label: str = "") -> None:
    """Name on stderr every file the run will skip (and captions it will guess) before any model loads: bad files
    never stop a run, and the user hears of them at once, not only in the run's events."""
    import os
    import sys

    from trainers.dataset import scan_lines

    lines = scan_lines(config)
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        for line in lines:
            print(f"warning: {label}{line}", file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    from trainers.checkpoints import latest_checkpoint
    from trainers.events import EventLog
    from trainers.loop import train

    config = config_from_args(args)
    run_dir = Path(args.resume or args.run_dir or default_run_dir_for(config.method, config.out)).expanduser().resolve()
    # A run killed before its first checkpoint has nothing to resume: the same command may start it again.
    if not args.resume and latest_checkpoint(run_dir / "checkpoints") is not None:
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    print(f"run folder: {run_dir}", flush=True)
    try:
        from trainers.dataset import DatasetConfig

        warn_dataset(DatasetConfig(config.data, caption=config.caption, trigger=config.trigger))
        if config.prior_data:
            warn_dataset(DatasetConfig(config.prior_data, trigger=config.prior_trigger), "prior: ")
        result = train(config, make_method(config.method), run_dir, resume=bool(args.resume))
    except UserError as exc:
        EventLog(run_dir).write("error", message=str(exc))
        raise
    except Exception as exc:
        EventLog(run_dir).write("error", message=f"{exc.__class__.__name__}: {exc}")
        raise
    if result.status == "stopped":
        print(f"stopped at step {result.step}; continue with: python launch.py train {config.method} "
              f"--resume {run_dir}", flush=True)
    else:
        loss = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
        print(done_line(result, f"{result.artifact} (step {result.step}{loss})"), flush=True)
    return 0


def run_train_sr(args: argparse.Namespace) -> int:
    from trainers.dsclora import DscLoraConfig, train_dsclora

    base = DscLoraConfig()
    if args.resume:
        import json

        try:
            base = DscLoraConfig(**json.loads((Path(args.resume) / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{args.resume}: not a DSCLoRA run folder ({exc})") from exc
    config = DscLoraConfig(**{**base.__dict__, **options_from_args(args, args.option_fields)}).validate()
    run_dir = Path(args.resume or args.run_dir or default_run_dir_for("sr", config.out)).expanduser().resolve()
    print(f"run folder: {run_dir}", flush=True)
    from trainers.dataset import DatasetConfig

    warn_dataset(DatasetConfig(config.hr_folder, caption=""))  # HR images need no captions
    result = train_dsclora(config, run_dir, resume=bool(args.resume))
    if result.status == "stopped":
        print(f"stopped at step {result.step}; continue with: python launch.py train sr --resume {run_dir}")
    else:
        print(done_line(result, f"{result.artifact} (step {result.step})"), flush=True)
    return 0
