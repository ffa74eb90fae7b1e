"""Break-for-Make in the micro world: content (a novel shape) × style (a novel fill), against two LoRA baselines.

    python bench/b4m_microworld.py [--stage-steps 600 | --content-steps 800 --style-steps 400] [--combine-steps 200]
    # or side by side on two cores, then joined:
    python bench/b4m_microworld.py --only b4m --out b4m.json ... &
    python bench/b4m_microworld.py --only sum,joint --out loras.json ...
    python bench/b4m_microworld.py --merge b4m.json loras.json

Content = the shape ``star`` (trigger ``sks``), style = the fill ``stripes`` on base shapes (trigger ``w@z``; the
captions do not name the fill, so only the trigger can carry it). Methods, all from the shipped micro base model, on
the same images and the same total steps:
- **B4M**: content run and style run (``content-steps``, ``style-steps``; auxiliary sets: one-object base-set
  scenes), then combine + ``combine-steps`` joint steps;
- **two LoRAs summed**: one LoRA on the content images, one on the style images (each its stage's steps +
  ``combine-steps/2``), applied together at strength 1;
- **one joint LoRA**: one LoRA on both folders (all the steps B4M takes).
The LoRAs adapt the same layers with the rank that gives about B4M's trainable count. The judge reads samples of
"sks w@z a <colour> star in the center ..." in every base colour: content accuracy = star seen, style accuracy =
stripes seen — by the old judge (the CNN's labels) and the new one (labels counted only on a well-formed object, see
``microworld/fidelity.py``), content also with the prompt's position checked.
Writes ``bench/results/b4m_microworld.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = REPO / "assets" / "micro-sd"
CONTENT, STYLE = "star", "stripes"
CONTENT_TRIGGER, STYLE_TRIGGER = "sks", "w@z"


def content_images(folder: Path, n: int) -> Path:
    from microworld.evaluation import novel_shape_set

    return novel_shape_set(folder, CONTENT, n, seed=3)


def style_images(folder: Path, n: int) -> Path:
    from microworld.evaluation import novel_fill_set

    return novel_fill_set(folder, STYLE, n, seed=5)


def joint_images(folder: Path, content: Path, style: Path) -> Path:
    """Both folders in one, each caption with its own trigger (what a single LoRA trains on)."""
    folder.mkdir(parents=True, exist_ok=True)
    for source, trigger in ((content, CONTENT_TRIGGER), (style, STYLE_TRIGGER)):
        for image in source.glob("*.png"):
            stem = f"{source.name}-{image.stem}"
            shutil.copy(image, folder / f"{stem}.png")
            text = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
            (folder / f"{stem}.txt").write_text(f"{trigger} {text}\n", encoding="utf-8")
    return folder


def accuracies(model, adapters: tuple, n_seeds: int, seed: int) -> dict:
    """Content and style accuracy of "sks w@z a <colour> star" over the base colours × ``n_seeds`` seeds."""
    from microworld.evaluation import content_and_style

    return content_and_style(model, adapters, CONTENT, STYLE, f"{CONTENT_TRIGGER} {STYLE_TRIGGER}", n_seeds, seed)


def train_b4m(work: Path, content: Path, style: Path, aux_styles: Path, aux_contents: Path, options: dict, *,
              content_steps: int, style_steps: int, combine_steps: int, lr: float, combine_lr: float) -> dict:
    """The three Break-for-Make stages from the micro model (batch 4, seed 0): ``b4m-content``, ``b4m-style`` and the
    combined ``b4m`` .safetensors in ``work``; returns seconds and trainable count per stage. The effect test
    (tests/test_b4m_microworld.py) trains through this too."""
    from accelerate.state import AcceleratorState

    from trainers.break_for_make import B4MMethod
    from trainers.loop import TrainConfig, train

    files = {"content": work / "b4m-content.safetensors", "style": work / "b4m-style.safetensors",
             "combine": work / "b4m.safetensors"}
    settings = {
        "content": dict(data=str(content), trigger=CONTENT_TRIGGER, prior_data=str(aux_styles), steps=content_steps,
                        lr=lr, method_options=options),
        "style": dict(data=str(style), trigger=STYLE_TRIGGER, prior_data=str(aux_contents), steps=style_steps, lr=lr,
                      method_options=options),
        "combine": dict(data=str(content), trigger=CONTENT_TRIGGER, prior_data=str(style), prior_trigger=STYLE_TRIGGER,
                        steps=combine_steps, lr=combine_lr,
                        method_options={**options, "content": str(files["content"]), "style": str(files["style"])}),
    }
    stages = {}
    for stage, config in settings.items():
        AcceleratorState._reset_state(reset_partial_state=False)
        method = B4MMethod(stage)
        started = time.perf_counter()
        result = train(TrainConfig(out=str(files[stage]), model=str(MODEL), batch_size=4, checkpoint_every=10**6,
                                   seed=0, **config), method, work / f"run-{files[stage].stem}")
        if result.status != "done":
            raise RuntimeError(f"the {stage} run ended {result.status}")
        stages[stage] = {"seconds": round(time.perf_counter() - started, 1), "trainable": method.summary()["trainable"]}
    return stages


def run(args: argparse.Namespace) -> dict:
    from accelerate.state import AcceleratorState

    from models.loading import load_model
    from trainers.aux_sets import microworld_aux
    from trainers.lora import LoraMethod
    from trainers.loop import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="b4m-bench-"))
    content = content_images(work / "content", args.images)
    style = style_images(work / "style", args.images)
    aux_styles = microworld_aux(work / "aux-styles", args.aux, seed=1)
    aux_contents = microworld_aux(work / "aux-contents", args.aux, seed=2)
    joint = joint_images(work / "joint", content, style)
    model = load_model(MODEL)
    model.pipe.set_progress_bar_config(disable=True)
    common = dict(model=str(MODEL), batch_size=4, checkpoint_every=10**6, seed=0)

    def fit(method, out: Path, **config) -> tuple[float, list[float]]:
        AcceleratorState._reset_state(reset_partial_state=False)
        started = time.perf_counter()
        result = train(TrainConfig(out=str(out), **common, **config), method, work / f"run-{out.stem}")
        return time.perf_counter() - started, result.losses

    rows = []
    b4m_opts = {"rank": args.rank, "seed": 0, "targets": args.targets, "preconditioned": args.preconditioned}
    stages = {}
    if not args.only or "b4m" in args.only:
        stages.update(train_b4m(work, content, style, aux_styles, aux_contents, b4m_opts,
                                content_steps=args.content_steps, style_steps=args.style_steps,
                                combine_steps=args.combine_steps, lr=args.lr, combine_lr=args.combine_lr))
        trainable = stages["content"]["trainable"]
        for label, files in (("B4M combined", ("b4m",)), ("B4M content + style, no stage 2", ("b4m-content", "b4m-style")),
                             ("B4M content only", ("b4m-content",)), ("B4M style only", ("b4m-style",))):
            row = {"method": label, "trainable": trainable,
                   **accuracies(model, tuple((str(work / f"{f}.safetensors"), 1.0) for f in files), args.seeds,
                                args.seed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lora_opts = {"rank": args.lora_rank, "targets": args.targets}
    lora_trainable = lora_count(args.lora_rank, args.targets)
    if not args.only or "sum" in args.only:
        t1, _ = fit(LoraMethod(), work / "lora-content.safetensors", data=str(content), trigger=CONTENT_TRIGGER,
                    steps=args.content_steps + args.combine_steps // 2, lr=args.lora_lr, method_options=lora_opts)
        t2, _ = fit(LoraMethod(), work / "lora-style.safetensors", data=str(style), trigger=STYLE_TRIGGER,
                    steps=args.style_steps + args.combine_steps // 2, lr=args.lora_lr, method_options=lora_opts)
        stages["two LoRAs"] = {"seconds": round(t1 + t2, 1)}
        row = {"method": "two LoRAs summed", "trainable": lora_trainable,
               **accuracies(model, ((str(work / "lora-content.safetensors"), 1.0),
                                    (str(work / "lora-style.safetensors"), 1.0)), args.seeds, args.seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.only or "joint" in args.only:
        secs, _ = fit(LoraMethod(), work / "lora-joint.safetensors", data=str(joint),
                      steps=args.content_steps + args.style_steps + args.combine_steps, lr=args.lora_lr, method_options=lora_opts)
        stages["joint LoRA"] = {"seconds": round(secs, 1)}
        row = {"method": "one joint LoRA", "trainable": lora_trainable,
               **accuracies(model, ((str(work / "lora-joint.safetensors"), 1.0),), args.seeds, args.seed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = {"method": "base model", "trainable": 0, **accuracies(model, (), args.seeds, args.seed)}
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": [base] + rows, "stages": stages,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "only")} |
                        {"threads": torch.get_num_threads(), "model": str(MODEL.relative_to(REPO))}}


def merge(parts: list[dict]) -> dict:
    """Partial runs of the same settings as one result: the base row once, every method row, every stage."""
    settings = [{k: v for k, v in p["settings"].items() if k != "only"} for p in parts]
    if any(s != settings[0] for s in settings[1:]):
        raise SystemExit("the partial results were measured with different settings; not merging")
    rows = [parts[0]["rows"][0]] + [r for p in parts for r in p["rows"][1:]]
    return {"rows": rows, "stages": {k: v for p in parts for k, v in p["stages"].items()}, "settings": settings[0]}


def lora_count(rank: int, targets: list[str]) -> int:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    total = 0
    for name, module in unet.named_modules():
        if not any(name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):  # LoCon: down is a conv with the layer's kernel, up a 1×1
            total += rank * (module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels)
    return total


def markdown(result: dict) -> str:
    from report import new_judge_note, rate

    s = result["settings"]
    loras = any("LoRA" in r["method"] for r in result["rows"])
    baselines = (f"LoRAs (rank {s['lora_rank']}): the same images and total steps at lr {s['lora_lr']:g}"
                 if loras else "no LoRA baselines in this run")
    recipe = (f"B4M: content run {s['content_steps']} steps, style run {s['style_steps']} steps "
              f"({s['aux']} auxiliary micro-world images each) at lr {s['lr']:g}, {s['combine_steps']} combine steps "
              f"at lr {s['combine_lr']:g}, rank {s['rank']} PLP (files rank {2 * s['rank']}); {baselines}; batch 4, "
              f"layers {', '.join(s['targets'])}")
    lines = ["# Break-for-Make in the micro world", "",
             f"Content `{CONTENT}` (trigger `{CONTENT_TRIGGER}`) from {s['images']} images, style `{STYLE}` fill "
             f"(trigger `{STYLE_TRIGGER}`) from {s['images']} images. {recipe}. Judged on \"{CONTENT_TRIGGER} "
             f"{STYLE_TRIGGER} a <colour> {CONTENT} in the center ...\" in every base colour, {s['seeds']} seeds each "
             f"(seed {s['seed']}).", "",
             "| method | trainable | content (star): old judge | new judge | new, with position "
             "| style (stripes): old judge | new judge | product: old | new | both in one image: old judge "
             "| new judge | new, with position | malformed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def product(value) -> str:
        return "—" if value is None else f"{value:.2f}"

    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {rate(r['content'])} | {rate(r.get('content_new'))} "
                     f"| {rate(r.get('content_new_position'))} | {rate(r['style'])} | {rate(r.get('style_new'))} "
                     f"| {product(r['product'])} | {product(r.get('product_new'))} | {rate(r['both'])} "
                     f"| {rate(r.get('both_new'))} | {rate(r.get('both_new_position'))} | {rate(r.get('malformed'))} |")
    lines += ["", new_judge_note() + " Style, new judge: stripes read on a well-formed object. Malformed: share of "
              "the samples the new judge finds malformed."]
    lines += ["", "| stage | seconds | trainable |", "|---|---:|---:|"]
    for name, stage in result["stages"].items():
        lines.append(f"| {name} | {stage['seconds']} | {stage.get('trainable', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage-steps", type=int, default=600)
    parser.add_argument("--content-steps", type=int, help="steps of the content run (default: --stage-steps)")
    parser.add_argument("--style-steps", type=int, help="steps of the style run (default: --stage-steps)")
    parser.add_argument("--combine-steps", type=int, default=200)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--aux", type=int, default=24, help="auxiliary images per stage-1 run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, help="default: rank/2 (the same trainable count as the PLP halves)")
    parser.add_argument("--targets", type=lambda t: t.split(","), default=["to_q", "to_k", "to_v", "to_out.0"])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--combine-lr", type=float, default=1e-3)
    parser.add_argument("--lora-lr", type=float, help="learning rate of the LoRA baselines (default: --lr)")
    parser.add_argument("--preconditioned", action="store_true")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per base colour")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--only", help="comma-separated: b4m, sum, joint")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "b4m_microworld.json"))
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no training: join the results of partial runs (--only, run side by side) into --out")
    args = parser.parse_args(argv)
    from report import measure_micro, write_report

    if args.merge:
        result = merge([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge])
        write_report(args.out, result, markdown(result))
        return 0
    torch.set_num_threads(args.threads)
    args.lora_rank = args.lora_rank or max(1, args.rank // 2)
    args.lora_lr = args.lora_lr or args.lr
    args.content_steps = args.content_steps or args.stage_steps
    args.style_steps = args.style_steps or args.stage_steps
    return measure_micro(MODEL, args.out, lambda: run(args), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
