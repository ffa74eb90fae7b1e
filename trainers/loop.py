"""The shared training loop every method trains through (diffusion denoising loss on a dataset folder).

A method (LoRA, SaRA, …) only says what is trainable, how its state is saved and how its artefact is written
(:class:`TrainingMethod`); this loop owns everything else: accelerate (devices, mixed precision, several
processes), gradient accumulation and checkpointing, noise offset, min-SNR weighting, diffusers' learning-rate
schedulers and preview samples. Stop, resume, ETA, events and checkpoints are the run loop's
(:mod:`trainers.run_loop`), which every other trainer shares: this module is its denoising-loss step.

Several processes (``torchrun`` / ``accelerate launch``) give the same weights as one process with the same global
batch: every process draws the whole global batch's noise, timesteps and latent samples from one seeded generator
and takes its own slice, and gradients are averaged over equal slices.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.atomic_files import write_text
from models.conditioning import SDXL, Conditioning, condition, model_family, text_encoders
from core.errors import UserError

from trainers.dataset import BatchPlan, DataPosition, DatasetConfig, ImageFolderDataset, step_arithmetic
from trainers.events import EventLog
from trainers.method import TrainingMethod
from trainers.run_loop import STOP_FILE, AcceleratePeers, RunLoop, StepReport, StepTrainer, StopFlag, TrainResult

__all__ = ["STOP_FILE", "StopFlag", "TrainConfig", "TrainResult", "TrainingMethod", "mixed_precision_for",
           "snr_weights", "train"]

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    data: str
    out: str
    method: str = "lora"
    model: str | None = None
    steps: int = 500
    batch_size: int = 1  # global batch, split across processes
    grad_accum: int = 1
    lr: float | None = None  # None: the method's default (LoRA 1e-4; SaRA derives it from its threshold)
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0: off
    # Encode images to the VAE posterior mean (as the micro base was trained) or draw a sample from it. For SD's VAE
    # the posterior is so narrow that both agree; a wide one (the micro VAE: std ~0.3 of latent std 0.8) turns
    # sampling into extra noise the UNet never saw, which a LoRA then learns as texture.
    latent_sample: bool = False
    seed: int = 0
    prior_data: str | None = None  # a second folder (prior-preservation or auxiliary images) with captions
    prior_weight: float = 1.0
    prior_trigger: str | None = None  # prepended to the second folder's captions (None: used as written)
    caption_dropout: float = 0.0  # share of the main folder's captions replaced by "" (keeps unconditional skill)
    resolution: int = 0  # 0: the model's native size
    repeats: int = 1
    caption: str | None = None
    trigger: str | None = None
    buckets: bool = False
    checkpoint_every: int = 100
    sample_every: int = 0  # 0: only at the end
    # Validation loss (at every checkpoint and at the end): a folder of images + captions, or a share of the training
    # images held out (every n-th by name). Fixed noise and timesteps per image, so the values compare across steps.
    validation_data: str | None = None
    validation_split: float = 0.0
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    device: str = "auto"
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.grad_accum >= 1, "gradient accumulation must be at least 1"),
            (self.lr is None or self.lr > 0, "learning rate must be positive"),
            (self.lr_scheduler in LR_SCHEDULERS, f"lr scheduler must be one of {', '.join(LR_SCHEDULERS)}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed precision must be one of {', '.join(MIXED_PRECISION)}"),
            (self.noise_offset >= 0, "noise offset must be ≥ 0"),
            (self.prior_weight >= 0, "prior weight must be ≥ 0"),
            (0.0 <= self.caption_dropout < 1.0, "caption dropout must be in [0, 1)"),
            (self.min_snr_gamma >= 0, "min-SNR gamma must be ≥ 0"),
            (self.checkpoint_every >= 1, "checkpoint interval must be at least 1"),
            (self.sample_every >= 0, "sample interval must be ≥ 0"),
            (0.0 <= self.validation_split < 1.0, "validation share must be in [0, 1)"),
            (not (self.validation_data and self.validation_split), "give a validation folder or a share, not both"),
            (bool(self.out) and self.out.endswith(".safetensors"), "--out must name a .safetensors file"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self

    def save(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"{path}: not a valid training config ({exc})") from exc


def mixed_precision_for(device: torch.device, requested: str) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for ε- or v-prediction."""
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # ε at a zero-terminal-SNR timestep: min(snr, γ)/snr → 1 as snr → 0 (0/0 would make the loss NaN)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def train(config: TrainConfig, method: TrainingMethod, run_dir: Path, *, resume: bool = False) -> TrainResult:
    """Run (or resume) a training; returns when done or stopped. Writes events, samples, checkpoints, artefact."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from models.devices import pick_device
    from models.loading import load_model

    config.validate()
    run_dir = Path(run_dir)
    device = pick_device(config.device)
    precision = mixed_precision_for(device, config.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise UserError(f"batch size {config.batch_size} must be divisible by the {world} processes")
    loop = RunLoop(run_dir, total=config.steps, checkpoint_every=config.checkpoint_every, resume=resume,
                   processes=AcceleratePeers(accelerator))  # a resume without a checkpoint is refused before the model
    log = loop.log
    if main:
        config.save(run_dir / "config.json")

    torch.manual_seed(config.seed)
    loop.phase("loading model")
    model = load_model(config.model, device=str(accelerator.device), dtype="fp32", attention="auto")
    pipe = model.pipe
    family = model_family(pipe)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    for frozen in (pipe.vae, *text_encoders(pipe), pipe.unet):
        frozen.requires_grad_(False)
        # SDXL's VAE overflows in fp16 (its config says force_upcast): it encodes in fp32, as diffusers' scripts do
        upcast = frozen is pipe.vae and bool(pipe.vae.config.get("force_upcast", False)) and family is SDXL
        if weight_dtype != torch.float32 and not upcast:  # frozen weights in half precision save memory
            frozen.to(accelerator.device, dtype=weight_dtype)
    vae_dtype = pipe.vae.dtype
    if loop.resumed is None and config.sample_prompts:  # the base model's images, for the previews to compare with
        _preview(pipe, config, run_dir, 0, log, accelerator, base=True)
    params = method.attach(pipe, config)
    if loop.resumed is not None:  # before the optimizer exists: restoring may change the parameter set (SaRA)
        params = method.load_trainable_state(loop.resumed.trainable) or params
    for p in params:  # trainable values stay fp32 under mixed precision
        p.data = p.data.float()
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()

    loop.phase("checking data")
    resolution = config.resolution or model.native_size
    multiple = int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    dataset = ImageFolderDataset(DatasetConfig(config.data, resolution=resolution, repeats=config.repeats,
                                               caption=config.caption, trigger=config.trigger,
                                               buckets=config.buckets), size_multiple=multiple)
    validation = dataset.split_off(config.validation_split) if config.validation_split else None
    if config.validation_data:
        validation = ImageFolderDataset(DatasetConfig(config.validation_data, resolution=resolution,
                                                      caption=config.caption, trigger=config.trigger,
                                                      buckets=config.buckets), size_multiple=multiple)
    plan = BatchPlan(dataset, config.batch_size, config.seed)
    # Prior preservation (DreamBooth): images of what the model should keep drawing, captions as written (no
    # trigger), their loss added with ``prior_weight`` at every step.
    prior = ImageFolderDataset(DatasetConfig(config.prior_data, resolution=resolution, buckets=config.buckets,
                                             trigger=config.prior_trigger),
                               size_multiple=multiple) if config.prior_data else None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type

    lr = config.lr if config.lr is not None else method.default_lr()
    optimizer = torch.optim.AdamW(method.param_groups(params, lr), lr=lr, weight_decay=1e-2)
    role = method.loss_role
    shared_noise = method.prior_shares_noise
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                 num_training_steps=config.steps)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    noise_gen = torch.Generator("cpu").manual_seed(config.seed + 1)

    pos = DataPosition()
    if loop.resumed is None:
        for line in dataset.report.lines():
            log.write("dataset", message=line)
        for line in prior.report.lines() if prior is not None else ():
            log.write("dataset", message=f"prior: {line}")
        if validation is not None:
            names = ", ".join(s.path.name for s in validation.samples)
            log.write("dataset", message=f"validation: {len(validation.samples)} image(s)"
                                         f"{' held out of training' if config.validation_split else ''}: {names}")
    summary = method.summary()
    if summary:
        log.write("method", method=method.name, lr=lr, **summary)
        if main and summary.get("selection"):
            print(f"{method.name}: {summary['selection']}; training with learning rate {lr:.3g}", flush=True)
    arithmetic = step_arithmetic(len(dataset.samples), config.repeats, config.batch_size, config.grad_accum,
                                 config.steps)
    if loop.resumed is None:
        log.write("geometry", images=dataset.geometry_lines())  # bucket and crop of every image (SDXL's time ids)
    # Text-encoder layers that train (a LoRA's lora_te*) need their graph; their gradients are averaged by hand over
    # processes, as only the UNet goes through accelerate's DDP wrapper.
    text_params = [p for encoder in text_encoders(pipe) for p in encoder.parameters() if p.requires_grad]

    def conditioning(samples) -> Conditioning:
        geometry = [s.micro_conditioning for s in samples]
        with torch.enable_grad() if text_params else torch.no_grad():
            return condition(pipe, [s.caption for s in samples], original_sizes=[g[0] for g in geometry],
                             crops=[g[1] for g in geometry], target_sizes=[g[2] for g in geometry],
                             device=accelerator.device)

    def denoising_loss(samples: list[_Item], size: tuple[int, int], global_batch: int, gen: torch.Generator,
                       sl: slice, timestep: int | None = None):
        """The (min-SNR weighted) denoising loss of this process's slice of a global batch; noise comes from ``gen``
        for the whole global batch, so any number of processes sees the same noise. ``timestep``: that one for
        every image instead of random ones (the validation loss)."""
        pixels = [s.pixels for s in samples]
        w, h = size
        lat_shape = (global_batch, pipe.vae.config.latent_channels, h // pipe.vae_scale_factor,
                     w // pipe.vae_scale_factor)
        eps_latent = torch.randn(lat_shape, generator=gen)
        noise = torch.randn(lat_shape, generator=gen)
        offset = torch.randn(lat_shape[:2] + (1, 1), generator=gen)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (global_batch,), generator=gen)
        if timestep is not None:
            timesteps = torch.full_like(timesteps, timestep)
        px = torch.stack(pixels).to(accelerator.device, dtype=vae_dtype)
        with torch.no_grad():
            dist = pipe.vae.encode(px).latent_dist
            spread = dist.std * eps_latent[sl].to(px) if config.latent_sample else 0.0
            latents = ((dist.mean + spread) * pipe.vae.config.scaling_factor).float()
        n = noise[sl].to(latents)
        if config.noise_offset:
            n = n + config.noise_offset * offset[sl].to(latents)
        t = timesteps[sl].to(accelerator.device)
        noisy = noise_scheduler.add_noise(latents, n, t)
        target = noise_scheduler.get_velocity(latents, n, t) if prediction_type == "v_prediction" else n
        cond = conditioning(samples)
        with accelerator.autocast():
            pred = unet(noisy.to(weight_dtype), t, **cond.unet_kwargs(weight_dtype)).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.min_snr_gamma:
            per_sample = per_sample * snr_weights(noise_scheduler.alphas_cumprod, t, config.min_snr_gamma,
                                                  prediction_type)
        return per_sample.mean()

    local = config.batch_size // world

    def take_step(step: int) -> StepReport:
        """One optimizer step of ``grad_accum`` micro-batches (this process's slice of each global batch)."""
        nonlocal pos, params, unet
        step_loss = 0.0
        for micro in range(config.grad_accum):
            indices, pos = plan.next(pos)
            sl = slice(rank * local, (rank + 1) * local)
            samples = [_Item.load(dataset, i) for i in indices[sl]]
            if config.caption_dropout:
                # Drawn for the whole global batch from a generator seeded by the step: a resume needs no extra state.
                drop_gen = torch.Generator("cpu").manual_seed(config.seed * 7_000_003 + step * 64 + micro)
                dropped = (torch.rand(config.batch_size, generator=drop_gen) < config.caption_dropout)[sl].tolist()
                samples = [s.without_caption() if d else s for s, d in zip(samples, dropped)]
            sync = micro == config.grad_accum - 1
            context = accelerator.no_sync(unet) if not sync and world > 1 else nullcontext()
            with context:
                noise_state = noise_gen.get_state()
                with role("data"):
                    loss = denoising_loss(samples, dataset.bucket_of(indices[0]), len(indices), noise_gen, sl)
                if prior is not None:
                    # Drawn from a generator seeded by the step, so a resume needs no extra state.
                    prior_gen = torch.Generator("cpu").manual_seed(config.seed * 1_000_003 + step * 64 + micro)
                    picks = torch.randint(0, len(prior.samples), (config.batch_size,), generator=prior_gen).tolist()
                    if shared_noise:
                        prior_gen = torch.Generator("cpu")
                        prior_gen.set_state(noise_state)
                    with role("prior"):
                        loss = loss + config.prior_weight * denoising_loss(
                            [_Item.load(prior, i) for i in picks[sl]], prior.bucket_of(picks[0]), len(picks), prior_gen,
                            sl)
                extra = method.extra_loss()
                if extra is not None:
                    loss = loss + extra
                accelerator.backward(loss / config.grad_accum)
            step_loss += loss.detach().float().item() / config.grad_accum
        if world > 1:
            for p in text_params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")
        method.before_optimizer_step()
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        changed = method.after_step(step + 1, optimizer)
        if changed:
            params = changed.pop("params")
            if world > 1:  # DDP's gradient buckets were built for the old parameters
                unet = accelerator.prepare_model(accelerator.unwrap_model(unet))
            log.write("parameters_changed", step=step + 1, **changed)
        return StepReport(step_loss, {"lr": lr_scheduler.get_last_lr()[0], "epoch": pos.epoch})

    def restore_position(position: dict[str, Any]) -> None:
        nonlocal pos
        pos = DataPosition(int(position["epoch"]), int(position["batch"]))

    def validate(step: int) -> None:
        """The mean denoising loss over every validation image at VALIDATION_TIMESTEPS fixed timesteps, each with
        its own fixed noise: the same numbers for the same weights (every process computes it, so the wrapped
        UNet's collectives match)."""
        span = noise_scheduler.config.num_train_timesteps
        fixed = [int((k + 0.5) * span / VALIDATION_TIMESTEPS) for k in range(VALIDATION_TIMESTEPS)]
        unet.eval()
        losses = []
        with torch.no_grad(), role("data"):
            for i in range(len(validation.samples)):
                item = _Item.load(validation, i)
                for t in fixed:
                    gen = torch.Generator("cpu").manual_seed(config.seed * 1_000_033 + i * 1_009 + t)
                    losses.append(denoising_loss([item], validation.bucket_of(i), 1, gen, slice(0, 1), t).item())
        unet.train()
        log.write("validation", step=step, loss=round(sum(losses) / len(losses), 6), images=len(validation.samples),
                  timesteps=fixed)

    def after_logged(step: int) -> None:
        if validation is not None and step % config.checkpoint_every == 0 and step < config.steps:
            validate(step)
        due = bool(config.sample_every) and step % config.sample_every == 0
        if (loop.sample_requested() or due) and step < config.steps:
            _preview(pipe, config, run_dir, step, log, accelerator)

    def finish(step: int) -> dict[str, Any]:
        if validation is not None:
            validate(step)
        if config.sample_prompts:
            _preview(pipe, config, run_dir, step, log, accelerator)
        if not main:
            return {"artifact": None}
        method.save_artifact(Path(config.out), model, config)
        return {"artifact": str(Path(config.out).resolve())}

    trainer = StepTrainer(step=take_step, trainable_state=method.trainable_state, optimizer=optimizer,
                          lr_scheduler=lr_scheduler, finish=finish, generators={"noise": noise_gen},
                          position=lambda: {"epoch": pos.epoch, "batch": pos.batch}, restore_position=restore_position,
                          after_logged=after_logged)
    if validation is not None and loop.resumed is None:
        validate(0)  # the base model's, where the curve starts
    return loop.run(trainer, arithmetic=arithmetic, device=str(accelerator.device), mixed_precision=precision,
                    processes=world, trainable_parameters=sum(p.numel() for p in params), lr=lr,
                    model_family=family.describe(pipe))


@dataclass
class _Item:
    """One training image as the loss needs it: pixels, caption and SDXL's micro-conditioning."""

    pixels: torch.Tensor
    caption: str
    micro_conditioning: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    @classmethod
    def load(cls, dataset: ImageFolderDataset, index: int) -> "_Item":
        pixels, caption = dataset.load(index)
        return cls(pixels, caption, dataset.sample(index).micro_conditioning)

    def without_caption(self) -> "_Item":
        return _Item(self.pixels, "", self.micro_conditioning)


VALIDATION_TIMESTEPS = 4  # evenly spread over the schedule: 125, 375, 625, 875 of 1000


def _preview(pipe, config: TrainConfig, run_dir: Path, step: int, log: EventLog, accelerator, *,
             base: bool = False) -> None:
    """Sample the preview prompts, all from the same seed, so previews compare across steps and across prompts (a
    content × style grid differs only by its prompts); ``base``: the model before training, the same way."""
    if not accelerator.is_main_process or not config.sample_prompts:
        accelerator.wait_for_everyone()
        return
    from core.png_metadata import format_parameters, save_png_with_parameters

    pipe.unet.eval()
    folder = run_dir / "samples"
    paths = []
    for i, prompt in enumerate(config.sample_prompts):
        generator = torch.Generator("cpu").manual_seed(config.seed)
        with torch.no_grad(), accelerator.autocast():
            image = pipe(prompt, num_inference_steps=config.sample_steps, generator=generator).images[0]
        path = folder / (f"base-{i:03d}.png" if base else f"step-{step:07d}-{i:03d}.png")
        save_png_with_parameters(image, path, format_parameters(prompt, "", {"Steps": config.sample_steps,
                                                                             "Seed": config.seed,
                                                                             "Training step": step}))
        paths.append(str(path.relative_to(run_dir)))
    pipe.unet.train()
    log.write("sample", step=step, paths=paths, prompts=config.sample_prompts, **({"base": True} if base else {}))
    accelerator.wait_for_everyone()
