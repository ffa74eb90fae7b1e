"""Train a SPAN upscaler from scratch: how the shipped default SR model was made.

    python -m trainers.sr_pretrain --out assets/sr/span-x4-default.safetensors [--steps 3000] [--channels 26]

No pretrained SR weights can be downloaded here, so the default model is trained on the real photos that
scikit-image bundles (install the ``assets`` extra). Three colour photos are held out for the benchmark and never
trained on. The network trains in its Conv3XC form (the over-parameterised branches converge faster) and is saved
folded, so it is exactly as fast as the release layout. Seeded; it runs through the run loop (stop with
Ctrl-C or a STOP file, events, checkpoints), and rerunning the command continues a stopped run exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.span import SPAN, SpanConfig, num_parameters

from trainers.checkpoints import latest_checkpoint
from trainers.hr_crops import HRCrops
from trainers.run_loop import RunLoop, StepReport, StepTrainer, TrainResult

# scikit-image's bundled photos (no download needed). Grey ones are used as grey RGB.
TRAIN_PHOTOS = ("astronaut", "brick", "camera", "clock", "coins", "grass", "gravel", "hubble_deep_field",
                "immunohistochemistry", "moon", "page", "retina", "text")
HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket")


@dataclass
class PretrainConfig:
    out: str
    photos: str  # folder the training photos are written to (and read from)
    channels: int = 26
    scale: int = 4
    steps: int = 3000
    batch_size: int = 16
    patch: int = 32  # LR patch side
    lr: float = 2e-3
    seed: int = 0
    checkpoint_every: int = 250


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as uint8 RGB (grey ones as grey RGB)."""
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array[..., :3].astype(np.uint8)


def write_photos(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """Write scikit-image's bundled photos as PNG files (the HR folder the trainer and the benchmark read)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.is_file():
            Image.fromarray(photo(name)).save(path)
        paths.append(path)
    return paths


def pretrain(config: PretrainConfig, run_dir: Path, log=print) -> TrainResult:
    """Train with L1 on random crops (cosine learning rate) through the run loop, then fold and save with metadata.
    A run folder holding a checkpoint is continued exactly (rerun the same command after a stop or a crash)."""
    from pipelines.upscale import save_sr_model

    run_dir = Path(run_dir)
    loop = RunLoop(run_dir, total=config.steps, checkpoint_every=config.checkpoint_every,
                   resume=latest_checkpoint(run_dir / "checkpoints") is not None)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    write_photos(Path(config.photos), TRAIN_PHOTOS)
    torch.manual_seed(config.seed)
    network = SPAN(SpanConfig(channels=config.channels, scale=config.scale))
    if loop.resumed is not None:
        network.load_state_dict(loop.resumed.trainable)
        log(f"resumed at step {loop.resumed.state.step}")
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                    pct_start=0.05)
    data = HRCrops(config.photos, config.scale, config.patch, config.seed)
    clock = {"elapsed": 0.0, "since": time.time()}  # wall clock over every session of the run
    window: list[float] = []

    def elapsed() -> float:
        return clock["elapsed"] + time.time() - clock["since"]

    def step(done: int) -> StepReport:
        lr_img, hr_img = data.batch(config.batch_size)
        loss = F.l1_loss(network(lr_img), hr_img)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if (done + 1) % 50 == 0:
            log(f"step {done + 1}/{config.steps} l1 {np.mean(window):.4f} {elapsed():.0f}s")
            window.clear()
        return StepReport(loss.item(), {"lr": scheduler.get_last_lr()[0]})

    def restore_position(position: dict) -> None:
        data.restore(position["data"])
        clock.update(elapsed=float(position["elapsed"]), since=time.time())

    def finish(at: int) -> dict:
        wall = elapsed()
        network.eval().reparameterize()
        out = save_sr_model(network, Path(config.out), {
            "atelier.method": "span-pretrain", "atelier.settings": json.dumps(asdict(config)),
            "span.training_photos": ",".join(TRAIN_PHOTOS), "span.wall_clock_s": f"{wall:.0f}",
            "span.parameters": str(num_parameters(network))})
        log(f"saved {out} ({num_parameters(network)} parameters) after {wall:.0f}s")
        return {"artifact": str(out)}

    network.train()
    trainer = StepTrainer(step=step, optimizer=optimizer, lr_scheduler=scheduler, finish=finish,
                          trainable_state=lambda: {k: v.detach().clone() for k, v in network.state_dict().items()},
                          position=lambda: {"data": data.state(), "elapsed": elapsed()},
                          restore_position=restore_position)
    result = loop.run(trainer, parameters=num_parameters(network), method="span-pretrain")
    if result.status == "stopped":
        log(f"stopped at step {result.step}; rerun the same command to continue")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", default="runs/sr-pretrain", help="checkpoints; rerun the command to resume")
    parser.add_argument("--photos", help="folder for the training photos (default: RUN_DIR/photos)")
    for name in ("channels", "steps", "batch_size", "patch", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    overrides = {k: getattr(args, k) for k in ("channels", "steps", "batch_size", "patch", "seed", "lr")
                 if getattr(args, k) is not None}
    pretrain(PretrainConfig(out=args.out, photos=args.photos or str(run_dir / "photos"), **overrides), run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
