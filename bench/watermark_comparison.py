"""Three ways to watermark what the micro model generates, measured the same way: the watermark LoRA, full-decoder
fine-tuning (Stable Signature style) and post-hoc dwtDct (``invisible-watermark``).

    python bench/watermark_comparison.py [--steps 200] [--latents 32] [--lr 5e-4] [--full-lr 1e-4] [--images 16]
                                         [--clean 1000] [--quick]

- **watermark LoRA**: ``trainers/watermark_lora.py`` as in ``bench/watermark_microworld.py`` (shipped extractor,
  a fixed 48-bit key, ``--steps`` steps at ``--lr`` on ``--latents`` sampled latents).
- **full decoder**: the same trainer with ``mode="full_decoder"``: same latents, extractor, losses and loss-weight
  scheduler, every parameter of the VAE decoder trained (at ``--full-lr``).
- **dwtDct**: the same key written after generation by ``invisible-watermark``'s dwtDct, which refuses images under
  256 × 256: the micro model's 64-px generations are upscaled to 256 px (PIL bicubic) first and everything about
  dwtDct (attacks, PSNR/SSIM, clean images) is measured at 256 px. An attacked image smaller than 256 × 256 (crops,
  resizes) is resized back to 256 × 256 (bicubic) before decoding.

For each: bit accuracy of ``--images`` fresh generations (``microworld.watermark_evaluation.fresh_requests``: other
prompts and seeds than training) clean and under every attack of ``pipelines.watermark.attacks.ATTACKS``, the share
flagged at FPR 1e-6 (exact binomial, ``pipelines.watermark.stats``), the same generations without the watermark
(flagged?), PSNR/SSIM of marked vs unmarked same-seed image, flags on ``--clean`` clean micro-world scenes (the
scenes ``bench/watermark_extractor.py`` uses) against the owner's key and against one random key each, trainable
parameters, seconds to 99 % training bit accuracy and seconds per method. Writes
``bench/results/watermark_comparison.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MODEL = REPO / "assets" / "micro-sd"
KEY = "5c3a9e1f07b2"  # the key of bench/watermark_microworld.py
FPR = 1e-6
CLEAN_SEED = 1  # the clean scenes bench/watermark_extractor.py reads (its default seed)
DWT_SIZE = 256  # dwtDct refuses images with fewer than 256 × 256 pixels


# -- dwtDct (invisible-watermark) on PIL images --------------------------------------------------------------------


def dwt_size(image: Image.Image) -> Image.Image:
    """``image`` as dwtDct can take it: resized (bicubic) to 256 × 256 when it has fewer pixels than that."""
    image = image.convert("RGB")
    if image.width * image.height < DWT_SIZE * DWT_SIZE:
        image = image.resize((DWT_SIZE, DWT_SIZE), Image.BICUBIC)
    return image


def dwt_embed(image: Image.Image, key: torch.Tensor) -> Image.Image:
    """``key`` (0/1 tensor) written into ``image`` (at least 256 × 256) by dwtDct, as an 8-bit RGB image."""
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", [int(b) for b in key.tolist()])
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1]))


def dwt_read(image: Image.Image, bits: int) -> torch.Tensor:
    """The ``bits`` dwtDct reads from ``image`` (resized to 256 × 256 first when smaller), as a 0/1 tensor."""
    from imwatermark import WatermarkDecoder

    bgr = np.ascontiguousarray(np.asarray(dwt_size(image))[:, :, ::-1])
    return torch.tensor(np.asarray(WatermarkDecoder("bits", bits).decode(bgr, "dwtDct"), dtype=np.float32))


# -- measuring ----------------------------------------------------------------------------------------------------


def quality(plain: list[Image.Image], marked: list[Image.Image]) -> dict:
    from core.image_metrics import psnr, ssim

    return {"psnr": float(np.mean([psnr(np.asarray(a), np.asarray(b)) for a, b in zip(plain, marked)])),
            "ssim": float(np.mean([ssim(np.asarray(a.convert("L")), np.asarray(b.convert("L")))
                                   for a, b in zip(plain, marked)]))}


def attacked(read, key: torch.Tensor, marked: list[Image.Image]) -> dict:
    """Per attack: mean bit accuracy and images flagged at FPR (``read``: image → 0/1 bits)."""
    from pipelines.watermark.attacks import ATTACKS, attack_image
    from pipelines.watermark.stats import threshold

    need = threshold(len(key), FPR)
    out = {}
    for name in ATTACKS:
        matched = [int((read(attack_image(image, name)) == key).sum()) for image in marked]
        out[name] = {"bit_accuracy": sum(matched) / (len(key) * len(matched)),
                     "flagged": sum(m >= need for m in matched)}
    return out


def flagged(read, key: torch.Tensor, images: list[Image.Image]) -> int:
    from pipelines.watermark.stats import threshold

    need = threshold(len(key), FPR)
    return sum(int((read(image) == key).sum()) >= need for image in images)


def clean_flags(read, key: torch.Tensor, scenes: list[Image.Image], seed: int) -> dict:
    """Clean images against the owner's key and against one random key each (as bench/watermark_extractor.py)."""
    from pipelines.watermark.stats import threshold

    bits = len(key)
    gen = torch.Generator().manual_seed(seed)
    owner, random_, readouts = [], [], set()
    for image in scenes:
        got = read(image)
        readouts.add(tuple(int(b) for b in got.tolist()))
        owner.append(int((got == key).sum()))
        random_.append(int((got == torch.randint(0, 2, (bits,), generator=gen).float()).sum()))
    mean = sum(owner) / len(owner)
    return {"images": len(scenes), "matched_mean": mean,
            "matched_std": math.sqrt(sum((m - mean) ** 2 for m in owner) / len(owner)),
            "flagged": sum(m >= threshold(bits, FPR) for m in owner),
            "flagged_random_keys": sum(m >= threshold(bits, FPR) for m in random_),
            "flagged_random_keys_1e-2": sum(m >= threshold(bits, 1e-2) for m in random_),
            "distinct_readouts": len(readouts)}


def trained(model, mode: str, lr: float, args: argparse.Namespace, work: Path) -> tuple[Path, dict]:
    """One watermark training run (LoRA or full decoder): the artefact and what the run measured."""
    from trainers.events import read_events
    from trainers.watermark_lora import WatermarkConfig, train_watermark

    out = work / f"{mode}.safetensors"
    started = time.perf_counter()
    run = train_watermark(WatermarkConfig(out=str(out), key=KEY, mode=mode, max_steps=args.steps,
                                          latents=args.latents, lr=lr, seed=args.seed, psnr_floor=args.psnr_floor),
                          work / mode, model=model)
    seconds = time.perf_counter() - started
    start = next(e for e in read_events(work / mode) if e["event"] == "start")
    return out, {"lr": lr, "steps": run.result.step, "trainable": start["trainable_parameters"],
                 "train_seconds": round(seconds, 1),
                 "seconds_to_99": None if run.seconds_to_99 is None else round(run.seconds_to_99, 1),
                 "final_train": run.history[-1]}


def run(args: argparse.Namespace) -> dict:
    from pipelines.generation import generate
    from models.loading import load_model
    from microworld.scenes import SceneConfig, generate_scenes
    from microworld.watermark_evaluation import content_kept, fresh_requests
    from pipelines.watermark.extractor import extractor_hash, load_extractor
    from pipelines.watermark.keys import parse_key
    from pipelines.watermark.shipped import default_extractor_path
    from pipelines.watermark.verify import read_bits
    from trainers.watermark_lora import decoder_state_applied

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="wm-compare-"))
    model = load_model(MODEL)
    extractor = load_extractor(default_extractor_path())
    bits = extractor.config.bits
    key = parse_key(KEY, bits)

    def read_extractor(image: Image.Image) -> torch.Tensor:
        return read_bits(extractor, image)

    def read_dwt(image: Image.Image) -> torch.Tensor:
        return dwt_read(image, bits)

    requests = fresh_requests(args.images, args.seed)

    def generations(**extra) -> list[Image.Image]:
        return [next(generate(model, dataclasses.replace(r, **extra))).image for r in requests]

    plain = generations()
    scenes = [scene.to_pil() for scene in generate_scenes(args.clean, seed=20_000 + CLEAN_SEED, config=SceneConfig())]
    methods: dict[str, dict] = {}

    lora_file, lora = trained(model, "lora", args.lr, args, work)
    marked = generations(watermark=str(lora_file))
    methods["watermark LoRA"] = {**lora, "size": model.native_size, "attacks": attacked(read_extractor, key, marked),
                                 "unmarked_flagged": flagged(read_extractor, key, plain), **quality(plain, marked),
                                 "content": content_kept(marked, args.images, args.seed)}

    full_file, full = trained(model, "full_decoder", args.full_lr, args, work)
    with decoder_state_applied(model.pipe, full_file):
        marked = generations()
    methods["full decoder"] = {**full, "size": model.native_size, "attacks": attacked(read_extractor, key, marked),
                               "unmarked_flagged": methods["watermark LoRA"]["unmarked_flagged"],
                               **quality(plain, marked), "content": content_kept(marked, args.images, args.seed)}
    # Same extractor, same key: one clean-image measurement serves both extractor-based methods.
    clean = clean_flags(read_extractor, key, scenes, CLEAN_SEED)
    for name in ("watermark LoRA", "full decoder"):
        methods[name]["clean"] = {**clean, "size": model.native_size}

    big = [dwt_size(image) for image in plain]
    started = time.perf_counter()
    marked = [dwt_embed(image, key) for image in big]
    seconds = time.perf_counter() - started
    methods["dwtDct"] = {"lr": None, "steps": 0, "trainable": 0, "train_seconds": None, "seconds_to_99": None,
                         "embed_seconds": round(seconds, 2), "size": DWT_SIZE,
                         "attacks": attacked(read_dwt, key, marked), "unmarked_flagged": flagged(read_dwt, key, big),
                         **quality(big, marked),
                         "content": content_kept([image.resize(plain[0].size, Image.BICUBIC) for image in marked],
                                                 args.images, args.seed),
                         "clean": {**clean_flags(read_dwt, key, [dwt_size(s) for s in scenes], CLEAN_SEED),
                                   "size": DWT_SIZE}}
    return {"methods": methods, "content_unmarked": content_kept(plain, args.images, args.seed),
            "bits": bits, "key": KEY, "fpr": FPR, "extractor_hash": extractor_hash(extractor),
            "total_seconds": round(time.perf_counter() - began, 1),
            "settings": {**vars(args), "threads": torch.get_num_threads()}}


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:g}"


def markdown(r: dict) -> str:
    from report import rate

    s, m = r["settings"], r["methods"]
    n = s["images"]
    lora, full, dwt = m["watermark LoRA"], m["full decoder"], m["dwtDct"]
    lines = [
        "# Watermark LoRA vs full-decoder fine-tuning vs dwtDct (micro model)", "",
        f"{r['bits']}-bit key `{r['key']}`; verdicts at FPR {r['fpr']:g} (exact binomial: ≥ "
        f"{_threshold(r['bits'], r['fpr'])} of {r['bits']} bits). Watermark LoRA (rank 4, alpha 32, decoder up-block "
        f"convs) and full-decoder fine-tuning (every VAE decoder parameter): the same trainer, shipped extractor "
        f"(`{r['extractor_hash']}`), {s['latents']} sampled latents, losses and loss-weight scheduler, "
        f"{s['steps']} steps at lr {lora['lr']:g} and {full['lr']:g}. dwtDct: `invisible-watermark`, written after "
        f"generation. {n} fresh generations (other prompts and seeds than training), each with and without the "
        "watermark (same seed).", "",
        "| method | trainable parameters | bit accuracy | flagged | unmarked generations flagged | PSNR vs unmarked "
        "| SSIM vs unmarked | clean scenes flagged | seconds to 99 % (training) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, x in m.items():
        none = x["attacks"]["none"]
        seconds = x["train_seconds"] if x["train_seconds"] is not None else x["embed_seconds"]
        lines.append(f"| {name} | {x['trainable']:,} | {none['bit_accuracy']:.3f} | {none['flagged']}/{n} "
                     f"| {x['unmarked_flagged']}/{n} | {x['psnr']:.1f} dB | {x['ssim']:.3f} "
                     f"| {x['clean']['flagged']}/{x['clean']['images']} | {_seconds(x['seconds_to_99'])} "
                     f"| {_seconds(seconds)} |")
    lines += ["", "What the marked generations show (a watermark should leave the content alone): share showing every "
                  "object their caption names, old judge (the CNN's labels) / new judge (each object well formed) / "
                  "new judge with positions. dwtDct's 256-px images are judged resized back to "
                  f"{lora['size']} px (bicubic).", "",
              "| | old judge | new judge | new judge, with positions |", "|---|---:|---:|---:|"]
    for name, c in [*((name, x.get("content")) for name, x in m.items()), ("unmarked", r.get("content_unmarked"))]:
        c = c or {}
        lines.append(f"| {name} | {rate(c.get('old'))} | {rate(c.get('new'))} | {rate(c.get('new_position'))} |")
    lines += ["", f"Under attack: bit accuracy (flagged of {n}); attacks at 64 px for the extractor-based methods, at "
                  "256 px for dwtDct.", "",
              "| attack | " + " | ".join(m) + " |", "|---|" + "---:|" * len(m)]
    for attack in lora["attacks"]:
        lines.append(f"| {attack} | " + " | ".join(f"{x['attacks'][attack]['bit_accuracy']:.3f} "
                                                 f"({x['attacks'][attack]['flagged']}/{n})" for x in m.values()) + " |")
    lines += ["", "Notes:",
              f"- dwtDct refuses images under 256 × 256: it is applied to the unmarked {lora['size']}-px generations "
              f"upscaled to {dwt['size']} px (PIL bicubic), and its PSNR/SSIM, attacks and clean images are measured "
              "at 256 px; attacked images smaller than 256 × 256 (crops, resizes) are resized back to 256 × 256 "
              "(bicubic) before decoding. Its seconds are the time to write the key into the "
              f"{n} images (no training).",
              "- Seconds for the trained methods are the whole training call (sampling the latents included); "
              "seconds to 99 % is the first time the mean bit accuracy of 5 consecutive training batches reached "
              "0.99.",
              f"- Clean scenes: {lora['clean']['images']} micro-world scenes (no model, no watermark; the scenes of "
              "bench/watermark_extractor.py) compared with the owner's key; the extractor-based methods share one "
              "measurement (same extractor, same key). Against one random key each instead: "
              + "; ".join(f"{name} {x['clean']['flagged_random_keys']} flagged at {r['fpr']:g}, "
                          f"{x['clean']['flagged_random_keys_1e-2']} at 0.01 ({0.01 * x['clean']['images']:g} "
                          f"expected)" for name, x in (("extractor", lora), ("dwtDct", dwt))) + ". Matched bits with "
              f"the owner's key: extractor {lora['clean']['matched_mean']:.2f} ± {lora['clean']['matched_std']:.2f}, "
              f"dwtDct {dwt['clean']['matched_mean']:.2f} ± {dwt['clean']['matched_std']:.2f} (fair coins: "
              f"{r['bits'] / 2:g} ± {math.sqrt(r['bits']) / 2:.2f}); distinct {r['bits']}-bit strings read from the "
              f"clean scenes: extractor {lora['clean']['distinct_readouts']}, dwtDct "
              f"{dwt['clean']['distinct_readouts']}.",
              "- Full decoder: every parameter of the VAE's `decoder` module (its 1×1 `post_quant_conv` before it "
              "stays frozen). The LoRA row is bench/watermark_microworld.py's recipe unchanged.",
              f"- Final training batch: LoRA bit accuracy {lora['final_train']['bit_accuracy']:.3f}, PSNR "
              f"{lora['final_train']['psnr']:.1f} dB after {lora['steps']} steps; full decoder "
              f"{full['final_train']['bit_accuracy']:.3f}, {full['final_train']['psnr']:.1f} dB after "
              f"{full['steps']} steps.",
              f"- One run, {r['total_seconds']:g} s in all on {s['threads']} CPU thread(s)"
              + (" (--quick: a smoke run, not a measurement)" if s["quick"] else "") + ".", ""]
    return "\n".join(lines)


def _threshold(bits: int, fpr: float) -> int:
    from pipelines.watermark.stats import threshold

    return threshold(bits, fpr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="watermark LoRA learning rate")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="full-decoder learning rate")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--psnr-floor", type=float, default=0.0,
                        help="the trainer's PSNR floor (default 0: the paper's schedule alone, as this table was "
                             "measured; bench/watermark_keys.py measures the trainer's defaults)")
    parser.add_argument("--clean", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="training and fresh-generation seed")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 steps, 8 latents, 4 images, 50 clean")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.latents, args.images, args.clean = 10, 8, 4, 50
    if args.out is None:  # a smoke run's numbers are not results: they go to the temporary folder
        args.out = str(Path(tempfile.gettempdir()) / "watermark_comparison_quick.json") if args.quick \
            else str(REPO / "bench" / "results" / "watermark_comparison.json")
    from report import measure_micro

    if importlib.util.find_spec("imwatermark") is None:
        print("dwtDct needs invisible-watermark: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    import cv2  # installed with invisible-watermark

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    return measure_micro(MODEL, args.out, lambda: run(args), markdown)


if __name__ == "__main__":
    raise SystemExit(main())
