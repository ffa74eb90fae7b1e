#!/usr/bin/env python3
"""Atelier's launcher: ``python launch.py`` opens the studio; sub-commands run the same work headless.

Every command prints ``--help``; a failure the user can fix exits non-zero with one line, never a traceback
(set ``ATELIER_DEBUG=1`` to see tracebacks).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# Feature modules that add their own sub-commands through ``register(subparsers)``.
# ``cli.watermark_train`` makes the ``watermark`` group (cli.watermark) and adds its training commands.
COMMAND_MODULES = ("cli.microworld", "cli.sara", "cli.train", "cli.watermark_train",
                   "cli.compose", "cli.adapter")


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, advisory warnings) out of the CLI's output."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    from huggingface_hub.utils import disable_progress_bars

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="diffusers folder, .safetensors checkpoint or Hub id (default: embedded model)")
    parser.add_argument("--config", help="diffusers config folder for a single-file checkpoint (default: shipped SD 1.x)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default: fp16 on CUDA, else fp32)")
    parser.add_argument("--attention", default="auto", help="auto, sdpa, xformers, default (default: auto)")


def add_ui_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--outputs", help="folder for generated images (default: <data folder>/outputs)")
    parser.add_argument("--auth", help="require a login, as user:password")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    add_model_options(parser)


def cmd_ui(args: argparse.Namespace) -> int:
    from app.studio import StudioConfig, serve

    serve(StudioConfig(host=args.host, port=args.port, model=args.model, config=args.config, device=args.device,
                       dtype=args.dtype, attention=args.attention, outputs=args.outputs, auth=args.auth,
                       share=args.share))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.errors import UserError
    from adapters.library import adapters_folder
    from core.paths import data_home
    from pipelines.generation import GenerationRequest, check_adapter_files, generate, parse_lora_arg, save_generated
    from pipelines.prompt_loras import lora_tags
    from models.loading import load_model

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file (got {args.out})")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {args.out} is a folder; name a .png file")
    library = adapters_folder(data_home())
    tagged = [path for path, _ in lora_tags(args.prompt, library)]  # <lora:NAME:WEIGHT> in the prompt
    check_adapter_files([parse_lora_arg(text)[0] for text in args.lora or ()] + tagged, args.watermark)  # before the model
    model = load_model(args.model, device=args.device, dtype=args.dtype, attention=args.attention, config=args.config)
    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative, steps=args.steps,
                                guidance=args.guidance, seed=args.seed, width=args.width, height=args.height,
                                scheduler=args.scheduler, batch_count=args.batch_count,
                                loras=tuple(parse_lora_arg(text) for text in args.lora or ()),
                                watermark=args.watermark, lora_folder=str(library))

    def progress(step: int, total: int) -> None:
        print(f"\rstep {step}/{total}", end="" if step < total else "\n", file=sys.stderr, flush=True)

    for index, item in enumerate(generate(model, request, on_step=progress)):
        target = out if request.batch_count == 1 else out.with_name(f"{out.stem}-{index + 1}{out.suffix}")
        save_generated(item, path=target)
        for warning in item.record["warnings"]:
            print(f"warning: {warning.removeprefix('WARNING: ')}", file=sys.stderr)
        print(f"{target} seed={item.seed} model={model.name} [{model.runtime.describe()}]")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from core.errors import UserError
    from core.image_files import open_image, shown_name
    from pipelines.upscale import load_sr_model, max_input_pixels, save_upscaled, upscale_image

    model = load_sr_model(args.model, device=args.device, allow_pth=args.official_pth)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in args.images:
        try:
            image = open_image(name, max_input_pixels())  # its message names the file; size checked before decoding
            result = upscale_image(model, image, tile=args.tile, outscale=args.scale)
        except UserError as exc:
            text = str(exc)
            prefix = "" if text.startswith(shown_name(name)) else f"{shown_name(name)}: "
            print(f"error: {prefix}{text}", file=sys.stderr)
            failures += 1
            continue
        target = save_upscaled(result, out_dir, Path(name).name, args.scale or model.scale)
        print(f"{target} {result.width}x{result.height} model={model.name}")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    from models.schedulers import MODEL_DEFAULT

    parser = argparse.ArgumentParser(prog="launch.py", description="Atelier: a diffusion customization studio. "
                                     "With no command, opens the studio in the browser.")
    add_ui_options(parser)
    parser.set_defaults(func=cmd_ui)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ui = sub.add_parser("ui", help="open the studio (the default)", description="Open the studio web page.")
    add_ui_options(ui)
    ui.set_defaults(func=cmd_ui)

    gen = sub.add_parser("generate", help="make images from a prompt",
                         description="Make images from a prompt; parameters are saved in the PNG and a .json sidecar.")
    gen.add_argument("--prompt", required=True, help="the prompt; <lora:NAME:WEIGHT> applies the Library's adapter NAME (A1111 style)")
    gen.add_argument("--out", required=True, help="output .png (with --batch-count N: OUT-1.png … OUT-N.png)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--seed", type=int, default=-1, help="seed (default: random)")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale")
    gen.add_argument("--width", type=int, help="default: the model's native size")
    gen.add_argument("--height", type=int, help="default: the model's native size")
    gen.add_argument("--scheduler", default=MODEL_DEFAULT, help="sampler, e.g. 'Euler a', 'DPM++ 2M Karras'")
    gen.add_argument("--batch-count", type=int, default=1)
    gen.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]",
                     help="apply a LoRA / adapter file with a strength (default 1.0); repeatable")
    gen.add_argument("--watermark", metavar="FILE", help="a watermark adapter: every image carries its key")
    add_model_options(gen)
    gen.set_defaults(func=cmd_generate)

    up = sub.add_parser("upscale", help="upscale images with a SPAN super-resolution model",
                        description="Upscale images (×4 with the shipped model), in tiles so memory stays bounded.")
    up.add_argument("images", nargs="+", metavar="IMAGE")
    up.add_argument("--out", required=True, help="output folder (NAME_x4.png per image)")
    up.add_argument("--model", help="SR model .safetensors (default: the shipped SPAN ×4)")
    up.add_argument("--official-pth", action="store_true", help="allow an official .pth release checkpoint")
    up.add_argument("--tile", type=int, default=256, help="tile size in input pixels (0: whole image)")
    up.add_argument("--scale", type=float, help="output size as a multiple of the input (default: the model's ×4)")
    up.add_argument("--device", default="auto")
    up.set_defaults(func=cmd_upscale)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # feature not installed in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        quiet_libraries()
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still gets one line unless debugging
        if os.environ.get("ATELIER_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: {exc.__class__.__name__}: {first} (set ATELIER_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
