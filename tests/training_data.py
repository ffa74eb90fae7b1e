"""Small datasets the training tests draw themselves (no files are shipped or downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def draw_dataset(folder: Path, n: int = 6, size: tuple[int, int] = (32, 32), caption: str = "a red circle",
                 shape: str = "circle") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (128, 128, 128))
        d = ImageDraw.Draw(im)
        x, y = 4 + (i * 3) % 8, 4 + (i * 5) % 8
        box = (x, y, x + size[0] // 2, y + size[1] // 2)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=(220, 30, 30))
        im.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(caption)
    return folder


def fixed_noise_loss(pipe, data: Path, caption: str, unet=None) -> float:
    """Denoising loss of ``unet`` (default: the pipeline's) on a dataset's images at fixed noise and timesteps,
    conditioned as the training loop conditions (SDXL: both encoders, pooled embedding, time ids): a training's
    effect, measured the same before and after."""
    from diffusers import DDPMScheduler

    from models.conditioning import condition
    from trainers.dataset import DatasetConfig, ImageFolderDataset

    unet = unet if unet is not None else pipe.unet
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    ds = ImageFolderDataset(DatasetConfig(str(data), resolution=native))
    px = torch.stack([ds.load(i)[0] for i in range(len(ds.samples))])
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(px).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(100, 900, (len(px),), generator=g)
        cond = condition(pipe, [caption] * len(px))
        pred = unet(sched.add_noise(latents, noise, t), t, **cond.unet_kwargs()).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


def assert_one_stop_and_resume(run_dir: Path, steps: int) -> None:
    """The event log of a run stopped once and resumed to the end: one ``stopped``, one ``resumed``, ``done`` last,
    and every step from 1 to ``steps`` logged exactly once, in order (a resume neither repeats nor skips a step)."""
    from trainers.events import read_events

    events = list(read_events(run_dir))
    kinds = [e["event"] for e in events]
    assert kinds.count("stopped") == 1 and kinds.count("resumed") == 1 and kinds[-1] == "done", kinds
    assert kinds.index("stopped") < kinds.index("resumed")
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, steps + 1))
    assert all(e["eta_s"] >= 0 for e in events if e["event"] == "step")


def stopping_after(calls: int, run_dir: Path, function):
    """``function`` that also writes the run's STOP file (as the Stop button does) on its ``calls``-th call: patched
    over something a trainer calls once a step, it stops the run after that many steps."""
    from trainers.run_loop import STOP_FILE

    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            (Path(run_dir) / STOP_FILE).write_text("stop requested\n")
        return function(*args, **kwargs)

    return wrapper
