"""Train a watermark bit extractor (with its encoder) under the noise layer: how the shipped one was made, and how
an owner makes a private one.

    python launch.py watermark train-extractor --out my-extractor.safetensors [--bits 48] [--steps 3000]

Images: micro-world scenes and scikit-image's bundled photos (random crops of 64–96 px), or a folder of the owner's.
Each step the encoder writes random bits into a batch (at a random phase), a share of the batches passes one random
distortion of the noise layer, and the extractor must read the bits back (BCE). At the end the extractor's outputs
are whitened on clean images (Stable Signature's recipe) so that bits of unmarked images behave like fair coins.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import UserError
from core.image_files import open_image, rgb_image
from core.safetensors_files import save_atomic
from pipelines.watermark.attacks import noise_layer
from pipelines.watermark.extractor import BitEncoder, BitExtractor, ExtractorConfig, extractor_hash, save_extractor

from trainers.dataset import IMAGE_SUFFIXES, check_image
from trainers.run_loop import RunLoop, StepReport, StepTrainer, random_state, set_random_state


@dataclass
class ExtractorTrainConfig:
    out: str
    bits: int = 48
    filters: int = 96
    kernel: int = 9
    tile: int = 8  # period of the encoder's textures
    steps: int = 3000
    batch_size: int = 12
    lr: float = 3e-3
    noise_probability: float = 0.5  # share of batches that pass the noise layer
    strength: float = 0.1  # encoder residual amplitude in [-1, 1] units
    sizes: tuple[int, ...] = (64, 64, 64, 96)  # crop side drawn per step
    microworld: int = 512  # micro-world scenes in the image pool
    folder: str | None = None  # the owner's images; default: scikit-image's photos + micro-world scenes
    whiten_images: int = 512
    seed: int = 0
    checkpoint_every: int = 250


def image_pool(config: ExtractorTrainConfig, log: Callable[[dict], None] = print) -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays: the owner's folder (bad files named in ``log`` and skipped), or micro-world scenes plus
    scikit-image's photos."""
    pool: list[np.ndarray] = []
    if config.folder:
        root = Path(config.folder).expanduser()
        if not root.is_dir():
            raise UserError(f"image folder {config.folder} does not exist")
        for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                check_image(path)
                pool.append(np.asarray(rgb_image(open_image(path))))  # 16-bit scaled, not clipped to white
            except (ValueError, UserError) as exc:
                log({"event": "skipped", "file": path.name, "reason": str(exc)})
        if not pool:
            raise UserError(f"{config.folder} holds no readable images")
        return pool
    from microworld.scenes import SceneConfig, generate_scenes

    pool += [s.image for s in generate_scenes(config.microworld, seed=config.seed + 17, config=SceneConfig())]
    try:
        from trainers.sr_pretrain import TRAIN_PHOTOS, photo

        pool += [photo(name) for name in TRAIN_PHOTOS]
    except ImportError:
        pass  # micro-world scenes alone (the assets extra brings the photos)
    return pool


def random_batch(pool: list[np.ndarray], n: int, side: int, rng: random.Random) -> torch.Tensor:
    """``n`` random crops of ``side`` px in [-1, 1]; images smaller than ``side`` are resized up first."""
    out = []
    for _ in range(n):
        image = pool[rng.randrange(len(pool))]
        h, w = image.shape[:2]
        if min(h, w) < side:
            f = side / min(h, w)
            image = np.asarray(Image.fromarray(image).resize((max(side, round(w * f)), max(side, round(h * f))),
                                                             Image.BICUBIC))
            h, w = image.shape[:2]
        elif rng.random() < 0.5 and min(h, w) >= 2 * side:  # photos: sometimes a downscaled view, not just detail
            f = rng.uniform(side / min(h, w), 1.0)
            image = np.asarray(Image.fromarray(image).resize((max(side, round(w * f)), max(side, round(h * f))),
                                                             Image.BICUBIC))
            h, w = image.shape[:2]
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
        crop = image[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(torch.from_numpy(crop.copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1


def default_run_dir(config: ExtractorTrainConfig) -> Path:
    out = Path(config.out)
    return out.with_name(out.stem + "-run")


def train_extractor(config: ExtractorTrainConfig, log: Callable[[dict], None] = print, *,
                    run_dir: Path | None = None, resume: bool = False) -> dict:
    """Train through the run loop (stop, exact resume, checkpoints, events in ``run_dir``), whiten, save; returns the
    run's summary (also stored in the file's metadata; ``hash`` is None for a stopped run, which saves nothing)."""
    if config.bits % 4 or not 8 <= config.bits <= 256:
        raise UserError("the key length must be a multiple of 4 bits between 8 and 256")
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    loop = RunLoop(run_dir, total=config.steps, checkpoint_every=config.checkpoint_every, resume=resume)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    pool = image_pool(config, log)
    spec = ExtractorConfig(bits=config.bits, filters=config.filters, kernel=config.kernel)
    encoder = BitEncoder(spec, strength=config.strength, tile=config.tile)
    extractor = BitExtractor(spec)
    networks = torch.nn.ModuleDict({"encoder": encoder, "extractor": extractor})
    if loop.resumed is not None:
        networks.load_state_dict(loop.resumed.trainable)
    params = list(encoder.parameters()) + list(extractor.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    progress = {"recent": [], "elapsed": 0.0}
    started = time.perf_counter()

    def elapsed() -> float:
        return progress["elapsed"] + time.perf_counter() - started

    def step(done: int) -> StepReport:
        images = random_batch(pool, config.batch_size, rng.choice(config.sizes), rng)
        bits = torch.randint(0, 2, (config.batch_size, config.bits)).float()
        marked = encoder(images, bits, rng)
        seen = noise_layer(marked, rng) if rng.random() < config.noise_probability else marked
        logits = extractor(seen)
        loss = F.binary_cross_entropy_with_logits(logits, bits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        accuracy = ((logits > 0).float() == bits).float().mean().item()
        progress["recent"].append(accuracy)
        if (done + 1) % 100 == 0 or done + 1 == config.steps:
            acc = sum(progress["recent"]) / len(progress["recent"])
            progress["recent"] = []
            log({"step": done + 1, "loss": round(loss.item(), 4), "bit_accuracy": round(acc, 4),
                 "elapsed_s": round(elapsed(), 1)})
        return StepReport(loss.item(), {"bit_accuracy": round(accuracy, 4)})

    def restore_position(position: dict) -> None:
        nonlocal started
        set_random_state(rng, position["random"])
        progress.update(recent=list(position["recent"]), elapsed=float(position["elapsed"]))
        started = time.perf_counter()

    summary: dict = {}

    def finish(at: int) -> dict:
        encoder.eval()
        extractor.eval()
        with torch.no_grad():
            clean = torch.cat([random_batch(pool, 64, 64, rng) for _ in range(max(1, config.whiten_images // 64))])
            extractor.fit_whitening(clean)
        summary.update({"steps": at, "seconds": round(elapsed(), 1), "hash": extractor_hash(extractor),
                        "config": asdict(config)})
        save_extractor(extractor, Path(config.out),
                       metadata={"extractor.training": json.dumps(summary), "extractor.whitened": "true"})
        encoder_path = Path(config.out).with_suffix(".encoder.safetensors")
        save_atomic(encoder.state_dict(), encoder_path,
                    metadata={"atelier.method": "watermark-encoder", "extractor.hash": summary["hash"],
                              "encoder.strength": str(config.strength), "encoder.tile": str(config.tile),
                              "extractor.bits": str(config.bits)})
        return {"artifact": str(Path(config.out).resolve())}

    trainer = StepTrainer(step=step, optimizer=optimizer, lr_scheduler=schedule, finish=finish,
                          trainable_state=lambda: {k: v.detach().clone() for k, v in networks.state_dict().items()},
                          position=lambda: {"random": random_state(rng), **progress, "elapsed": elapsed()},
                          restore_position=restore_position)
    result = loop.run(trainer, bits=config.bits, trainable_parameters=sum(p.numel() for p in params),
                      method="watermark-extractor")
    if result.status == "stopped":
        return {"status": "stopped", "steps": result.step, "seconds": round(elapsed(), 1), "hash": None,
                "run_dir": str(run_dir)}
    return {"status": "done", **summary, "run_dir": str(run_dir)}
