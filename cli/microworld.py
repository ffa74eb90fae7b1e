"""``launch.py microworld dataset|vocab|judge``: the micro world from the command line."""
from __future__ import annotations

import argparse
import json
import sys

from core.errors import UserError

# `launch.py --help` imports this module to register the command; the handlers import the work (torch and the
# models behind it) when they run, so the help stays instant.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "microworld", help="procedural scenes, their vocabulary and the judge",
        description="The micro world: a procedural image domain with ground truth, and a judge that reads it.")
    sub = parser.add_subparsers(dest="microworld_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: _usage(parser))

    data = sub.add_parser("dataset", help="write a folder of scenes with captions and ground truth",
                          description="Write N scenes as PNG files with same-name .txt captions and one "
                                      "ground_truth.json (labels, boxes) into OUT.")
    data.add_argument("--out", required=True, help="output folder (created if missing)")
    data.add_argument("--n", type=int, required=True, help="number of images")
    data.add_argument("--shape", help="draw only this shape (base or novel; default: base shapes)")
    data.add_argument("--color", help="draw only this colour")
    data.add_argument("--fill", help="draw only this fill style (default: solid)")
    data.add_argument("--objects", type=int, help="exactly K objects per image, 1-3 (default: 1 to 3)")
    data.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same images (default: 0)")
    data.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    data.set_defaults(func=handle_dataset)

    vocab = sub.add_parser("vocab", help="list the base and novel vocabularies",
                           description="List the base set (what the base model knows) and the novel set "
                                       "(reserved for customization).")
    vocab.add_argument("--json", action="store_true", help="print JSON")
    vocab.set_defaults(func=handle_vocab)

    judge = sub.add_parser("judge", help="classify shape, colour and fill of images",
                           description="Print the judge's top-1 shape, colour and fill with probabilities, "
                                       "one line per image.")
    judge.add_argument("images", nargs="+", metavar="IMAGE")
    judge.add_argument("--box", help="judge only this region, normalised x0,y0,x1,y1 (e.g. 0,0,0.5,1)")
    judge.add_argument("--json", action="store_true", help="print one JSON object per image")
    judge.add_argument("--weights", help="judge weights (default: the shipped assets/judge/judge.safetensors)")
    judge.set_defaults(func=handle_judge)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def handle_dataset(args: argparse.Namespace) -> int:
    from microworld.scenes import SceneConfig, SHAPES, FILLS, restrict, write_dataset

    base = SceneConfig(size=args.size)
    # A novel shape or fill asked for by name is allowed; the default pools stay the base set.
    if args.shape and args.shape not in SHAPES:
        raise UserError(f"unknown shape {args.shape!r} (choose from {', '.join(SHAPES)})")
    if args.fill and args.fill not in FILLS:
        raise UserError(f"unknown fill {args.fill!r} (choose from {', '.join(FILLS)})")
    config = restrict(base, shape=args.shape, color=args.color, fill=args.fill, objects=args.objects)
    summary = write_dataset(args.out, args.n, seed=args.seed, config=config)
    print(f"{summary.images} images in {summary.folder} (ground truth: {summary.ground_truth})")
    return 0


def handle_vocab(args: argparse.Namespace) -> int:
    from microworld.scenes import vocabulary

    vocab = vocabulary()
    if args.json:
        print(json.dumps(vocab))
        return 0
    for split, groups in vocab.items():
        print(f"{split}:")
        for name, words in groups.items():
            print(f"  {name}: {', '.join(words)}")
    return 0


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--box wants four numbers x0,y0,x1,y1 (got {text!r})") from None
    if len(values) != 4:
        raise UserError(f"--box wants four numbers x0,y0,x1,y1 (got {text!r})")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise UserError(f"--box must be normalised with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (got {text!r})")
    return values  # type: ignore[return-value]


def handle_judge(args: argparse.Namespace) -> int:
    from core.image_files import open_image, rgb_image

    from microworld.judge import judge_images, load_judge

    box = parse_box(args.box) if args.box else None
    images = [rgb_image(open_image(name)) for name in args.images]  # one-line refusals, size-guarded
    judge = load_judge(args.weights) if args.weights else None
    results = judge_images(images, boxes=[box] * len(images) if box else None, judge=judge)
    for name, result in zip(args.images, results):
        record = {"image": name, **result}
        if args.json:
            print(json.dumps(record))
        else:
            shape = (f"{result['shape']} ({result['shape_prob']:.2f}, fidelity {result['fidelity']:.2f})"
                     if result["verdict"] == "ok" else f"{result['verdict']} (fidelity {result['fidelity']:.2f}; "
                                                       f"the CNN says {result['shape']})")
            print(f"{name}: {result['color']} ({result['color_prob']:.2f}) {shape} {result['fill']} "
                  f"({result['fill_prob']:.2f}) {result['position'] or ''}".rstrip())
    return 0
