"""Train the micro world judge on generator output only and ship it to ``assets/judge/``.

    python -m trainers.judge_training [--steps 1200] [--out assets/judge]

Examples are whole single-object images (any position and size) and crops of multi-object scenes by their boxes
(with random margins, so neighbours may intrude), over every shape, colour, fill and background, including the
novel ones. Mild blur, rescaling and noise stand in for what a VAE decoder does to pixels. Seeded end to end.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from microworld.judge import HEADS, Judge, JudgeNet, JudgeVocab, crop, save_judge, to_input
from microworld.scenes import FILLS, SHAPES, SceneConfig, generate_scene

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class JudgeTrainingConfig:
    steps: int = 1200
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    width: int = 32
    seed: int = 0
    crop_fraction: float = 0.5  # share of examples cut from multi-object scenes
    color_jitter: float = 0.08
    augment: bool = True
    eval_images: int = 600
    eval_seed: int = 10_000  # held-out scenes come from a seed the training stream never uses


SINGLE = SceneConfig(shapes=SHAPES, fills=FILLS, max_objects=1, min_radius=0.08, max_radius=0.38)
MULTI = SceneConfig(shapes=SHAPES, fills=FILLS, min_objects=2, max_objects=3)


def sample_examples(rng: np.random.Generator, n: int, crop_fraction: float = 0.5, color_jitter: float = 0.0,
                    augment: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` judge inputs with labels: whole single-object images, or boxes (plus a margin) of busy scenes."""
    vocab = JudgeVocab()
    images, boxes, labels = [], [], {head: [] for head in HEADS}
    for _ in range(n):
        if rng.random() < crop_fraction:
            config = MULTI if not color_jitter else _jittered(MULTI, color_jitter)
            scene = generate_scene(rng, config)
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            x0, y0, x1, y1 = (v / config.size for v in obj.box)
            mx, my = (x1 - x0) * rng.uniform(0.0, 0.35, 2), (y1 - y0) * rng.uniform(0.0, 0.35, 2)
            box = (max(0.0, x0 - mx[0]), max(0.0, y0 - my[0]), min(1.0, x1 + mx[1]), min(1.0, y1 + my[1]))
        else:
            config = SINGLE if not color_jitter else _jittered(SINGLE, color_jitter)
            scene = generate_scene(rng, config)
            obj, box = scene.objects[0], None
        image = scene.to_pil()
        if augment:
            image = _augment(rng, image, box)
            box = None
        images.append(image)
        boxes.append(box)
        for head in HEADS:
            labels[head].append(getattr(vocab, head).index(getattr(obj, head)))
    return to_input(images, boxes), {head: torch.tensor(v) for head, v in labels.items()}


def _jittered(config: SceneConfig, amount: float) -> SceneConfig:
    from dataclasses import replace

    return replace(config, color_jitter=amount)


def _augment(rng: np.random.Generator, image: Image.Image, box) -> Image.Image:
    """Crop first (as the judge will), then blur/rescale/noise like a decoder might."""
    image = crop(image, box).resize((64, 64), Image.BILINEAR)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    if rng.random() < 0.2:
        small = int(rng.integers(32, 56))
        image = image.resize((small, small), Image.BILINEAR).resize((64, 64), Image.BILINEAR)
    if rng.random() < 0.5:
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(1, 8), (64, 64, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def heldout_accuracy(judge: Judge, n: int = 300, seed: int = 10_000) -> dict[str, float]:
    """Top-1 accuracy per head on clean generator images (half crops of busy scenes) from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    x, labels = sample_examples(rng, n)
    was_training = judge.net.training
    judge.net.eval()
    with torch.no_grad():
        logits = judge.net(x)
    judge.net.train(was_training)
    return {head: float((logits[head].argmax(1) == labels[head]).float().mean()) for head in HEADS}


def train(config: JudgeTrainingConfig, out: Path, log=print) -> dict:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 1])
    net = JudgeNet(JudgeVocab(), width=config.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / config.steps))))
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.time()
    net.train()
    for step in range(config.steps):
        x, labels = sample_examples(rng, config.batch, config.crop_fraction, config.color_jitter, config.augment)
        logits = net(x)
        loss = sum(loss_fn(logits[head], labels[head]) for head in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.steps - 1:
            log(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f}s")
    train_seconds = time.time() - started
    net.eval()
    judge = Judge(net, net.vocab)
    accuracy = heldout_accuracy(judge, config.eval_images, config.eval_seed)
    log(f"held-out accuracy {accuracy}")
    weights = out / "judge.safetensors"
    sha = save_judge(net, weights, extra={"training": json.dumps(asdict(config))})
    card = {"weights": weights.name, "sha256": sha, "parameters": sum(p.numel() for p in net.parameters()),
            "input_size": 64, "vocab": json.loads(net.vocab.to_json()), "training": asdict(config),
            "train_seconds_1_thread": round(train_seconds),
            "heldout_accuracy": {head: round(v, 4) for head, v in accuracy.items()},
            "heldout": f"{config.eval_images} clean generator images from seed {config.eval_seed}, half single-object "
                       "whole images, half crops of 2-3 object scenes by their boxes",
            "script": "python -m trainers.judge_training"}
    (out / "judge.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the micro world judge on generator output.")
    parser.add_argument("--out", default=str(REPO / "assets" / "judge"))
    parser.add_argument("--steps", type=int, default=JudgeTrainingConfig.steps)
    parser.add_argument("--batch", type=int, default=JudgeTrainingConfig.batch)
    parser.add_argument("--seed", type=int, default=JudgeTrainingConfig.seed)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = JudgeTrainingConfig(steps=args.steps, batch=args.batch, seed=args.seed)
    card = train(config, Path(args.out), log=lambda text: print(text, flush=True))
    print(json.dumps(card["heldout_accuracy"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
