"""Train the micro world's base model (VAE, then UNet + text encoder jointly) and export a diffusers SD folder.

    python -m trainers.microworld_base vae    --run RUN [--steps N]
    python -m trainers.microworld_base unet   --run RUN [--steps N] [--world small|base]
    python -m trainers.microworld_base snapshot --run RUN            # judge the latest checkpoint's EMA weights
    python -m trainers.microworld_base export --run RUN --out FOLDER
    python -m trainers.microworld_base sample --run RUN          # a judged grid of samples

Seeded and resumable: every stage checkpoints into the run folder every few minutes and continues exactly where it
stopped (weights, EMA, optimizer, step). Batches, noise and timesteps are pure functions of (seed, step), so a
resumed run takes the same path as an uninterrupted one.

The recipe, and why (the spec's probes with epsilon-prediction on SD's scaled-linear schedule never bound colour to
the prompt and drifted in colour): a cosine schedule reaches zero terminal SNR, so sampling starts from the same
pure noise the model was trained on instead of leaking the training image's mean colour; v-prediction then asks
the model, at the noisiest steps, for the expected image given the prompt, a direct text-to-colour regression
that plain epsilon loss barely weighs. Latents are cached once, normalised by the VAE scaling factor; captions are
dropped 10 % of the time for classifier-free guidance; the text encoder learns at its own, higher rate; EMA weights
are what ships.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from microworld.scenes import BASE_SHAPES, COLORS, FILLS, SHAPES, SceneConfig, generate_scene
from trainers.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "assets" / "clip_tokenizer"


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class VAEConfig:
    steps: int = 800
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    channels: tuple[int, ...] = (32, 64, 64)  # three levels: 64 px -> 16x16 latents
    kl_weight: float = 1e-6
    seed: int = 0


@dataclass(frozen=True)
class WorldConfig:
    """What the UNet sees. ``small`` proves the recipe (one centred object); ``base`` is the shipped world."""

    name: str = "base"
    images: int = 20_000
    single_share: float = 0.5  # share of one-object scenes in ``base`` (the rest have two or three)
    seed: int = 1


@dataclass(frozen=True)
class UNetConfig:
    steps: int = 3000
    batch: int = 32
    lr: float = 6e-4
    text_lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.998
    channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    text_hidden: int = 64
    text_layers: int = 2
    caption_dropout: float = 0.1
    object_weight: float = 1.0  # extra loss weight on latent pixels under objects (they are small)
    grad_clip: float = 1.0
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass(frozen=True)
class RunSettings:
    checkpoint_seconds: float = 240.0
    eval_every: int = 0  # steps between judged sample grids (0: only at the end)
    judge: bool = True  # sample and judge the exported pipeline at the end
    stop_at: int | None = None  # checkpoint and leave at this step (a planned interruption; resume later)


def _from_dict(cls, data: dict):
    fields = {f.name: f for f in cls.__dataclass_fields__.values()}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            continue
        if key == "world":
            value = WorldConfig(**value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- models


def build_vae(config: VAEConfig):
    from diffusers import AutoencoderKL

    levels = len(config.channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=config.channels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=16, sample_size=64)


def build_unet(config: UNetConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=config.layers_per_block,
        block_out_channels=config.channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=config.text_hidden, attention_head_dim=8, norm_num_groups=32)


def build_text_encoder(config: UNetConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=config.text_hidden, intermediate_size=4 * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=config.text_hidden))


def build_scheduler():
    from diffusers import DDIMScheduler

    # Cosine betas reach (numerically) zero terminal SNR; "trailing" spacing starts sampling at t = T.
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


# ---------------------------------------------------------------------------------------------- data


def vae_scene_config() -> SceneConfig:
    # The VAE is the world's image codec: it sees every shape and fill so that customization methods can later
    # teach novel concepts through it. The UNet and text encoder never see the novel set.
    return SceneConfig(shapes=SHAPES, fills=FILLS, min_radius=0.08, max_radius=0.35)


def world_scene(world: WorldConfig, index: int):
    rng = np.random.default_rng([world.seed, index])
    if world.name == "small":
        config = SceneConfig(max_objects=1, centered=True, backgrounds=("gray",), min_radius=0.26, max_radius=0.34)
    elif world.name == "base":
        count = 1 if rng.random() < world.single_share else int(rng.integers(2, 4))
        config = SceneConfig(min_objects=count, max_objects=count, min_radius=0.13, max_radius=0.24)
    else:
        raise ValueError(f"unknown world {world.name!r}")
    return generate_scene(rng, config)


def vae_batch(config: VAEConfig, step: int) -> torch.Tensor:
    rng = np.random.default_rng([config.seed, 99, step])
    images = np.stack([generate_scene(rng, vae_scene_config()).image for _ in range(config.batch)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- helpers


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    tmp.replace(path)


def _stage_config(run: Path, stage: str, config, cls):
    """The first invocation fixes a stage's config in the run folder; resumes reuse it (only ``steps`` may grow)."""
    path = run / f"{stage}_config.json"
    if path.is_file():
        saved = _from_dict(cls, json.loads(path.read_text()))
        if config.steps != saved.steps:
            saved = replace(saved, steps=config.steps)
            _write_json(path, asdict(saved))
        return saved
    _write_json(path, asdict(config))
    return config


class Logger:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


# ---------------------------------------------------------------------------------------------- VAE


def train_vae(run: Path, config: VAEConfig, settings: RunSettings = RunSettings()) -> Path:
    """Train the VAE (reconstruction + a whisper of KL) and save it to ``run/vae``; returns that folder."""
    run.mkdir(parents=True, exist_ok=True)
    config = _stage_config(run, "vae", config, VAEConfig)
    log = Logger(run / "log.txt")
    torch.manual_seed(config.seed)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup, config.steps))
    ckpt_dir = run / "checkpoints" / "vae"
    step, elapsed = _resume(ckpt_dir, {"vae": vae}, optimizer, scheduler, log)
    last_save, started = time.time(), time.time() - elapsed
    vae.train()
    while step < config.steps:
        x = vae_batch(config, step)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(config.seed * 7919 + step))
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if step % 50 == 0 or step == config.steps:
            log(f"vae step {step}/{config.steps} mse {F.mse_loss(recon, x).item():.5f} "
                f"{time.time() - started:.0f}s")
        if time.time() - last_save > settings.checkpoint_seconds or step == config.steps:
            save_checkpoint(ckpt_dir, step=step, epoch=0, batch=0, trainable=_prefixed({"vae": vae}),
                            optimizer=optimizer, scheduler=scheduler, generators={},
                            extra={"elapsed": time.time() - started})
            last_save = time.time()
    vae.eval()
    _calibrate_scaling(vae, config)
    out = run / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    mse = _vae_eval(vae, config)
    log(f"vae done: held-out mse {mse:.5f} scaling_factor {vae.config.scaling_factor:.4f} "
        f"wall-clock {time.time() - started:.0f}s")
    _write_json(run / "vae_result.json", {"heldout_mse": mse, "scaling_factor": vae.config.scaling_factor,
                                          "seconds": round(time.time() - started), "steps": config.steps})
    return out


@torch.no_grad()
def _calibrate_scaling(vae, config: VAEConfig) -> None:
    """SD's convention: scaling_factor = 1 / std of latents, so the diffusion model sees unit-variance latents."""
    x = torch.cat([vae_batch(replace(config, seed=config.seed + 1), s) for s in range(16)])
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))


@torch.no_grad()
def _vae_eval(vae, config: VAEConfig) -> float:
    x = torch.cat([vae_batch(replace(config, seed=config.seed + 2), s) for s in range(8)])
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float(F.mse_loss(recon, x))


# ---------------------------------------------------------------------------------------------- latent cache


@torch.no_grad()
def cache_latents(run: Path, world: WorldConfig, log) -> dict[str, torch.Tensor]:
    """Encode the world's scenes once (the encoder would otherwise cost a third of every step)."""
    from safetensors.torch import load_file, save_file
    from diffusers import AutoencoderKL

    path = run / f"latents-{world.name}-{world.images}-{world.seed}.safetensors"
    if path.is_file():
        return load_file(str(path))
    tokenizer = load_tokenizer()
    vae = AutoencoderKL.from_pretrained(run / "vae").eval()
    started = time.time()
    latents, ids, weights, captions = [], [], [], []
    for start in range(0, world.images, 256):
        scenes = [world_scene(world, i) for i in range(start, min(world.images, start + 256))]
        x = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        union = torch.from_numpy(np.stack([s.masks.any(0) for s in scenes])).float()[:, None]
        weights.append(F.adaptive_max_pool2d(union, latents[-1].shape[-2:]))
        captions += [s.caption for s in scenes]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cache = {"latents": torch.cat(latents).contiguous(), "input_ids": ids.contiguous(),
             "object_mask": torch.cat(weights).contiguous()}
    save_file(cache, str(path))
    log(f"cached {world.images} latents of world {world.name} in {time.time() - started:.0f}s "
        f"(mean {cache['latents'].mean():.3f}, std {cache['latents'].std():.3f})")
    return cache


# ---------------------------------------------------------------------------------------------- UNet + text


def _prefixed(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}


def _resume(ckpt_dir: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler, log) -> tuple[int, float]:
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return 0, 0.0
    state, tensors, opt_state = load_checkpoint(latest)
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict({**scheduler.state_dict(), **state.scheduler})
    log(f"resumed from {latest.name} (step {state.step})")
    return state.step, float(state.extra.get("elapsed", 0.0))


class EMA(torch.nn.Module):
    """Exponential moving average of parameters, kept as a module so it checkpoints like one."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.names = [f"{m}.{n}" for m, module in modules.items() for n, _ in module.named_parameters()]
        self.shadow = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                                              for module in modules.values() for p in module.parameters()])

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        params = [p for module in modules.values() for p in module.parameters()]
        torch._foreach_lerp_(list(self.shadow), [p.detach() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for shadow, p in zip(self.shadow, [p for module in modules.values() for p in module.parameters()]):
            p.copy_(shadow)


def unet_step_batch(cache: dict[str, torch.Tensor], config: UNetConfig, step: int):
    """Batch indices, noise, timesteps and caption dropout for ``step``: a pure function of (seed, step)."""
    n = cache["latents"].shape[0]
    index = torch.from_numpy(np.random.default_rng([config.seed, 5, step]).integers(0, n, config.batch))
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    latents = cache["latents"][index]
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, 1000, (config.batch,), generator=gen)
    drop = torch.rand(config.batch, generator=gen) < config.caption_dropout
    return index, latents, noise, timesteps, drop


def train_unet(run: Path, config: UNetConfig, settings: RunSettings = RunSettings()) -> Path:
    """Train UNet + text encoder jointly on cached latents; exports EMA weights to ``run/unet_final``."""
    config = _stage_config(run, "unet", config, UNetConfig)
    log = Logger(run / "log.txt")
    if not (run / "vae").is_dir():
        raise SystemExit(f"{run}/vae missing: run the vae stage first (or pass --vae)")
    cache = cache_latents(run, config.world, log)
    torch.manual_seed(config.seed)
    unet, text = build_unet(config), build_text_encoder(config)
    modules = {"unet": unet, "text": text}
    ema = EMA(modules)
    optimizer = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": config.lr, "weight_decay": 1e-2},
        {"params": list(text.parameters()), "lr": config.text_lr, "weight_decay": 0.0},
    ])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup, config.steps))
    noise_scheduler = build_scheduler()
    alphas = noise_scheduler.alphas_cumprod
    empty_ids = load_tokenizer()([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ckpt_dir = run / "checkpoints" / "unet"
    step, elapsed = _resume(ckpt_dir, {**modules, "ema": ema}, optimizer, scheduler, log)
    params = {"unet": sum(p.numel() for p in unet.parameters()), "text": sum(p.numel() for p in text.parameters())}
    log(f"unet stage: world {config.world.name}, {params}, from step {step} to {config.steps}")
    started, last_save, window = time.time() - elapsed, time.time(), []
    unet.train()
    text.train()
    while step < config.steps:
        index, x0, noise, t, drop = unet_step_batch(cache, config, step)
        ids = torch.where(drop[:, None], empty_ids, cache["input_ids"][index])
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        states = text(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=states).sample
        weight = 1.0 + config.object_weight * cache["object_mask"][index]
        loss = (weight * (pred - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules.values() for p in m.parameters()], config.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        ema.update(modules, min(config.ema_decay, (1 + step) / (10 + step)))
        window.append(loss.item())
        if step % 25 == 0 or step == config.steps:
            log(f"unet step {step}/{config.steps} loss {np.mean(window):.4f} {time.time() - started:.0f}s")
            window = []
        if time.time() - last_save > settings.checkpoint_seconds or step == config.steps:
            save_checkpoint(ckpt_dir, step=step, epoch=0, batch=0, trainable=_prefixed({**modules, "ema": ema}),
                            optimizer=optimizer, scheduler=scheduler, generators={},
                            extra={"elapsed": time.time() - started})
            last_save = time.time()
        if settings.stop_at is not None and step >= settings.stop_at and step < config.steps:
            save_checkpoint(ckpt_dir, step=step, epoch=0, batch=0, trainable=_prefixed({**modules, "ema": ema}),
                            optimizer=optimizer, scheduler=scheduler, generators={},
                            extra={"elapsed": time.time() - started})
            log(f"stopped at step {step} (resume to continue)")
            return run
        if settings.eval_every and step % settings.eval_every == 0 and step < config.steps:
            _export_and_judge(run, config, ema, log, tag=f"step{step}")
    log(f"unet done: {config.steps} steps, wall-clock {time.time() - started:.0f}s")
    return _export_and_judge(run, config, ema, log, tag="final", judge=settings.judge)


def _export_and_judge(run: Path, config: UNetConfig, ema: EMA, log, tag: str, judge: bool = True) -> Path:
    unet, text = build_unet(config), build_text_encoder(config)
    ema.copy_to({"unet": unet, "text": text})
    out = run / "pipeline"
    assemble_pipeline(run / "vae", unet, text).save_pretrained(out, safe_serialization=True)
    if not judge:
        return out
    report = quick_judge(out, world=config.world.name)
    _write_json(run / f"judge-{tag}.json", report)
    log(f"judged {tag}: {json.dumps({k: v for k, v in report.items() if k != 'samples'})}")
    return out


def snapshot(run: Path, judge: bool = True) -> Path:
    """Export (and judge) the EMA weights of the latest UNet checkpoint, e.g. while a long run is paused."""
    config = _from_dict(UNetConfig, json.loads((run / "unet_config.json").read_text()))
    latest = latest_checkpoint(run / "checkpoints" / "unet")
    if latest is None:
        raise SystemExit(f"no UNet checkpoint in {run}")
    state, tensors, _ = load_checkpoint(latest)
    unet, text = build_unet(config), build_text_encoder(config)
    ema = EMA({"unet": unet, "text": text})
    ema.load_state_dict({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")})
    return _export_and_judge(run, config, ema, Logger(run / "log.txt"), tag=f"snapshot{state.step}", judge=judge)


def assemble_pipeline(vae_dir: Path, unet, text):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir)
    return StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=load_tokenizer(), unet=unet.eval(),
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ---------------------------------------------------------------------------------------------- sampling + judging


def single_prompt(color: str, shape: str, background: str = "gray", position: str = "in the center") -> str:
    from microworld.scenes import object_phrase

    return f"{object_phrase(color, shape, 'solid', position)}, {background} background"


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0) -> list:
    images = []
    for start in range(0, len(prompts), 16):
        chunk = prompts[start:start + 16]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + 16]]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                       height=64, width=64).images
    return images


def quick_judge(pipeline_dir: Path, world: str = "base", guidance: float = 4.0, steps: int = 20) -> dict:
    """Every base colour x shape once (same seed for all): the judge's verdict and whether prompts change images."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    from microworld.judge import judge_images

    dlog.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = [(c, s) for c in COLORS for s in BASE_SHAPES]
    prompts = [single_prompt(c, s) for c, s in labels]
    images = sample(pipe, prompts, [1234] * len(prompts), steps=steps, guidance=guidance)
    verdicts = judge_images(images)
    color_ok = [v["color"] == c for v, (c, _) in zip(verdicts, labels)]
    shape_ok = [v["shape"] == s for v, (_, s) in zip(verdicts, labels)]
    grid = np.concatenate([np.concatenate([np.asarray(im) for im in images[r * 3:(r + 1) * 3]], 1)
                           for r in range(len(images) // 3)], 0)
    from PIL import Image

    Image.fromarray(grid).save(pipeline_dir.parent / f"grid-{world}.png")
    return {"color": float(np.mean(color_ok)), "shape": float(np.mean(shape_ok)),
            "both": float(np.mean([a and b for a, b in zip(color_ok, shape_ok)])),
            "samples": [{"prompt": p, "judged": f"{v['color']} {v['shape']}"} for p, v in zip(prompts, verdicts)]}


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("vae", "unet", "snapshot", "export", "sample"))
    parser.add_argument("--run", required=True, help="run folder (checkpoints, caches, logs); keep it outside the repo")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--world", choices=("small", "base"), default="base")
    parser.add_argument("--images", type=int, help="scenes in the latent cache")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--text-lr", type=float)
    parser.add_argument("--channels", help="UNet (or VAE) block channels, e.g. 64,128,128")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-seconds", type=float, default=240.0)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--out", help="export: destination folder")
    parser.add_argument("--vae", help="unet: reuse the trained VAE folder of another run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    settings = RunSettings(checkpoint_seconds=args.checkpoint_seconds, eval_every=args.eval_every)
    overrides = {k: v for k, v in {"steps": args.steps, "batch": args.batch, "lr": args.lr,
                                    "seed": args.seed}.items() if v is not None}
    if args.channels:
        overrides["channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.stage == "vae":
        train_vae(run, replace(VAEConfig(), **overrides), settings)
    elif args.stage == "unet":
        if args.vae and not (run / "vae").exists():
            run.mkdir(parents=True, exist_ok=True)
            (run / "vae").symlink_to(Path(args.vae).resolve())
        world = WorldConfig(name=args.world, **({"images": args.images} if args.images else {}))
        if args.text_lr is not None:
            overrides["text_lr"] = args.text_lr
        train_unet(run, replace(UNetConfig(world=world), **overrides), settings)
    elif args.stage == "snapshot":
        snapshot(run)
    elif args.stage == "export":
        if not args.out:
            parser.error("export needs --out")
        export(run, Path(args.out))
    else:
        print(json.dumps(quick_judge(run / "pipeline"), indent=1))
    return 0


def export(run: Path, out: Path, fp16: bool = True) -> Path:
    """Copy the run's pipeline to ``out`` (fp16 UNet and VAE by default, to fit the size budget). The text encoder
    stays fp32: transformers loads a model in its stored dtype while diffusers upcasts to fp32, so a plain
    ``StableDiffusionPipeline.from_pretrained(out)`` would otherwise meet an fp16 encoder beside an fp32 UNet."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    if fp16:
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
