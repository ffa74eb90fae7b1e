"""Watermark LoRA: a small LoRA on the VAE decoder's up-block convolutions so that every decoded image carries the
owner's key, read back by a fixed extractor.

Each step decodes the same latents with the frozen decoder (x̂, computed once per latent) and with decoder + LoRA (x̃):
    L = λ_i · L_img(x̃, x̂) + λ_w · BCE(extractor(noise(x̃)), key)
L_img = MSE + (1 − SSIM), both on [0, 1] pixels: no downloaded perceptual network needed. The loss weights follow the
extended paper's dynamic scheduler (:class:`LossWeightScheduler`), logged every step. Training stops when the final
targets (bit accuracy, PSNR) hold for ``patience_stop`` consecutive steps, or at ``max_steps``.

The artefact is an ordinary adapter file (layers ``vae.decoder...``) with the key (unless kept secret), the bit count
and the extractor's hash in its metadata; :func:`adapters.lora.apply.merge_lora` merges it into a pipeline's decoder.

``mode="full_decoder"`` is the Stable Signature baseline the comparison benchmark measures: the same latents,
extractor, losses and scheduler, but every parameter of ``vae.decoder`` trained instead of a LoRA. Its artefact is the
fine-tuned decoder's whole state (``decoder.*`` tensors, method ``watermark-decoder``, so it is never taken for a
watermark adapter); :func:`decoder_state_applied` swaps it into a pipeline for a block. The model's own decoder
weights come back unchanged after training in both modes.
"""
from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from core.errors import UserError

from trainers.watermark_config import MODES, WatermarkConfig
from trainers.run_loop import RunLoop, StepReport, StepTrainer, TrainResult, random_state, set_random_state

DECODER_METHOD = "watermark-decoder"  # the full-decoder artefact's atelier.method
LAYER_PATTERN = r"decoder\.up_blocks\.\d+\.(resnets\.\d+\.(conv1|conv2|conv_shortcut)|upsamplers\.0\.conv)"


@dataclass
class LossWeightScheduler:
    """The extended paper's scheduler: raise λ_w while bits lag, else λ_i while PSNR lags; a target met ``patience``
    times in a row is raised (μ += 0.08 up to a cap, ρ += 2.5 dB). Counters persist across steps."""

    bit_target: float = 0.9
    psnr_target: float = 30.0
    gamma: float = 0.25
    patience: int = 5
    bit_step: float = 0.08
    bit_cap: float = 0.99
    psnr_step: float = 2.5
    lambda_img: float = 1.0
    lambda_wm: float = 0.0
    bit_hits: int = 0
    psnr_hits: int = 0
    # Below this PSNR image quality comes first, whatever the bits: λ_i rises and λ_w falls back. Without it λ_w grows
    # without bound for a key the decoder cannot write cleanly and the images are wrecked (13–17 dB on the micro
    # model). Lowering λ_w too matters: λ_i grows large, and γ added to it alone barely moves the balance. None: the
    # paper's rule alone.
    psnr_floor: float | None = None

    def update(self, bit_accuracy: float, psnr: float) -> None:
        if self.psnr_floor is not None and psnr < self.psnr_floor:
            self.lambda_img += self.gamma
            self.lambda_wm = max(0.0, self.lambda_wm - 2 * self.gamma)
        elif bit_accuracy < self.bit_target:
            self.lambda_wm += 2 * self.gamma
        elif psnr < self.psnr_target:
            self.lambda_img += self.gamma
        self.bit_hits = self.bit_hits + 1 if bit_accuracy >= self.bit_target else 0
        self.psnr_hits = self.psnr_hits + 1 if psnr >= self.psnr_target else 0
        if self.bit_hits >= self.patience:
            self.bit_target = min(self.bit_cap, self.bit_target + self.bit_step)
            self.bit_hits = 0
        if self.psnr_hits >= self.patience:
            self.psnr_target += self.psnr_step
            self.psnr_hits = 0

    def state(self) -> dict:
        return {"lambda_img": round(self.lambda_img, 4), "lambda_wm": round(self.lambda_wm, 4),
                "bit_target": round(self.bit_target, 4), "psnr_target": round(self.psnr_target, 2)}


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM of images in [0, 1] (Gaussian window, per channel), differentiable."""
    sigma = 1.5
    x = torch.arange(window, dtype=a.dtype, device=a.device) - window // 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] (over the whole batch)."""
    mse = F.mse_loss(a, b).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def decoder_target_names(vae) -> list[str]:
    """The decoder's up-block convolutions (the spec's default place for the watermark)."""
    import re

    pattern = re.compile(LAYER_PATTERN + "$")
    names = [n for n, m in vae.named_modules() if isinstance(m, torch.nn.Conv2d) and pattern.match(n)]
    if not names:
        raise UserError("this VAE has no decoder up-block convolutions to watermark")
    return names


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (already divided by the model's own scaling factor: SD's 0.18215, SDXL's 0.13025) → images in [0, 1];
    computed in the VAE's dtype, whatever dtype the latents were kept in."""
    return (vae.decode(latents.to(vae.dtype)).sample.float().clamp(-1, 1) + 1) / 2


@torch.no_grad()
def collect_latents(model, config: WatermarkConfig) -> torch.Tensor:
    """Unscaled latents to train on: the encoded images of a folder, or samples of the base model."""
    pipe = model.pipe
    vae = pipe.vae
    if config.images:
        from trainers.dataset import DatasetConfig, ImageFolderDataset

        data = ImageFolderDataset(DatasetConfig(config.images, resolution=model.native_size, buckets=False),
                                  size_multiple=pipe.vae_scale_factor)
        out = []
        for i in range(min(len(data.samples), config.latents)):
            pixels, _ = data.load(i)
            out.append(vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist.mean.float().cpu())
        if not out:
            raise UserError(f"{config.images} holds no usable images")
        return torch.cat(out)
    prompts = list(config.prompts)
    if not prompts:
        from microworld.scenes import SceneConfig, generate_scenes

        prompts = [s.caption for s in generate_scenes(config.latents, seed=config.seed + 101, config=SceneConfig())]
    size = model.native_size
    out = []
    for start in range(0, config.latents, 8):
        chunk = [prompts[i % len(prompts)] for i in range(start, min(config.latents, start + 8))]
        gens = [torch.Generator("cpu").manual_seed(config.seed * 100_000 + start + j) for j in range(len(chunk))]
        latents = pipe(chunk, num_inference_steps=config.sample_steps, generator=gens, height=size, width=size,
                       output_type="latent").images
        out.append((latents / vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def prepare_trainable(vae, config: WatermarkConfig) -> tuple[list[torch.nn.Parameter], list[str]]:
    """Freeze the VAE, then make trainable what ``config.mode`` trains: a LoRA injected into the decoder's up-block
    convs (its fp32 parameters, and the layer names), or every parameter of ``vae.decoder`` (no layer names)."""
    vae.requires_grad_(False)
    if config.mode == "full_decoder":
        params = list(vae.decoder.parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise UserError("full-decoder fine-tuning needs the model loaded in fp32")
        for p in params:
            p.requires_grad_(True)
        return params, []
    from peft import LoraConfig, inject_adapter_in_model

    names = decoder_target_names(vae)
    inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=names,
                                       init_lora_weights=True), vae, adapter_name="watermark")
    params = [p for n, p in vae.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params, names


@contextmanager
def decoder_made_trainable(vae, config: WatermarkConfig) -> Iterator[tuple[list[torch.nn.Parameter], list[str]]]:
    """:func:`prepare_trainable` for a block; afterwards, also when training fails part-way, the model's decoder is
    exactly as before (the injected LoRA removed, or the fully trained decoder's weights put back) and frozen."""
    full = config.mode == "full_decoder"
    original = {k: v.detach().clone() for k, v in vae.decoder.state_dict().items()} if full else None
    try:
        yield prepare_trainable(vae, config)
    finally:
        if full:
            vae.decoder.load_state_dict(original)
        else:
            _remove_peft(vae)
        vae.requires_grad_(False)


@dataclass
class WatermarkRun:
    result: TrainResult
    key: str
    seconds_to_99: float | None
    history: list[dict] = field(default_factory=list)  # the steps this process ran (a resumed run: since the resume)


def train_watermark(config: WatermarkConfig, run_dir: Path, *, model=None, resume: bool = False) -> WatermarkRun:
    """Train the watermark LoRA (or, in ``full_decoder`` mode, the whole decoder) through the run loop; write the
    adapter file (or the decoder's state); return the run with its per-step history. A stop also writes the adapter
    as far as training got, and ``resume=True`` continues the run exactly from its last checkpoint."""
    from models.loading import load_model
    from pipelines.watermark.attacks import noise_layer
    from pipelines.watermark.extractor import extractor_hash, load_extractor
    from pipelines.watermark.keys import format_key, new_key, parse_key
    from pipelines.watermark.shipped import default_extractor_path

    config.validate()
    run_dir = Path(run_dir)
    loop = RunLoop(run_dir, total=config.max_steps, checkpoint_every=config.checkpoint_every, resume=resume)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    extractor = load_extractor(Path(config.extractor) if config.extractor else default_extractor_path())
    bits_n = extractor.config.bits
    key = parse_key(config.key or new_key(bits_n), bits_n)
    key_hex = format_key(key)
    # The run folder keeps the key (a drawn one too): a resumed run must train the same key.
    (run_dir / "config.json").write_text(json.dumps({**asdict(config), "key": key_hex}, indent=2))
    loop.phase("loading model")
    model = model or load_model(config.model, device=config.device, dtype="fp32")
    vae = model.pipe.vae
    device = vae.device
    extractor = extractor.to(device).requires_grad_(False)
    extractor_id = extractor_hash(extractor)
    loop.phase("caching latents")
    latents = collect_latents(model, config).to(device)
    with torch.no_grad():
        targets = torch.cat([decode(vae, latents[i:i + 8]) for i in range(0, len(latents), 8)])
    full = config.mode == "full_decoder"
    with decoder_made_trainable(vae, config) as (params, names):
        named = {n: p for n, p in vae.named_parameters() if p.requires_grad}
        if loop.resumed is not None:
            with torch.no_grad():
                for name, value in loop.resumed.trainable.items():
                    named[name].copy_(value)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        scheduler = LossWeightScheduler(config.bit_target, config.psnr_target, config.gamma, config.patience,
                                        config.bit_target_step, config.bit_target_cap, config.psnr_target_step,
                                        psnr_floor=config.psnr_floor or None)
        key_batch = key.to(device)[None]
        history: list[dict] = []
        # What a checkpoint's position keeps besides the data RNG: counters of the schedule and the early stop.
        progress = {"streak": 0, "recent_acc": [], "seconds_to_99": None, "elapsed": 0.0}
        started = time.perf_counter()

        def elapsed() -> float:
            return progress["elapsed"] + time.perf_counter() - started

        def step(done: int) -> StepReport:
            idx = torch.tensor(rng.sample(range(len(latents)), min(config.batch_size, len(latents))))
            marked = decode(vae, latents[idx])
            reference = targets[idx]
            clean = marked * 2 - 1
            attacked = rng.random() < config.noise_probability
            logits = extractor(noise_layer(clean, rng) if attacked else clean)
            wm_loss = F.binary_cross_entropy_with_logits(logits, key_batch.expand_as(logits))
            img_loss = F.mse_loss(marked, reference) + (1 - ssim(marked, reference))
            loss = scheduler.lambda_img * img_loss + scheduler.lambda_wm * wm_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                read = extractor(clean) if attacked else logits  # the unattacked bits are what the schedule watches
                acc = ((read > 0).float() == key_batch).float().mean().item()
                quality = psnr(marked, reference).item()
            scheduler.update(acc, quality)
            progress["recent_acc"] = (progress["recent_acc"] + [acc])[-5:]
            recent = progress["recent_acc"]
            if progress["seconds_to_99"] is None and len(recent) == 5 and sum(recent) / 5 >= 0.99:
                progress["seconds_to_99"] = elapsed()
            entry = {"bit_accuracy": round(acc, 4), "psnr": round(quality, 2), **scheduler.state()}
            history.append({"step": done + 1, "loss": round(loss.item(), 5), **entry})
            ok = acc >= config.stop_bit_accuracy and quality >= config.stop_psnr
            progress["streak"] = progress["streak"] + 1 if ok else 0
            finished = progress["streak"] >= config.patience_stop
            if finished:
                loop.log.write("early_stop", step=done + 1, reason=f"bit accuracy ≥ {config.stop_bit_accuracy} and "
                                                                  f"PSNR ≥ {config.stop_psnr} dB for "
                                                                  f"{progress['streak']} steps")
            return StepReport(loss.item(), {**entry, "elapsed_s": round(elapsed(), 2)}, finished)

        def position() -> dict:
            return {"random": random_state(rng), "schedule": asdict(scheduler), **progress, "elapsed": elapsed()}

        def restore_position(saved: dict) -> None:
            nonlocal started
            set_random_state(rng, saved["random"])
            for name, value in saved["schedule"].items():
                setattr(scheduler, name, value)
            progress.update({k: saved[k] for k in progress})
            started = time.perf_counter()

        def finish(at: int) -> dict:
            out = _save_watermark(vae, names, full, model, config, key_hex, bits_n, extractor_id, at,
                                  progress["seconds_to_99"])
            return {"artifact": str(out), "seconds_to_99": progress["seconds_to_99"]}

        def shortfalls(at: int) -> list[str]:
            return watermark_shortfalls(history, config, bits_n)

        trainer = StepTrainer(step=step, trainable_state=lambda: {n: p.detach().clone() for n, p in named.items()},
                              optimizer=optimizer, lr_scheduler=None, finish=finish, position=position,
                              restore_position=restore_position, artifact_when_stopped=True,
                              shortfalls=shortfalls, loss_should_fall=False)
        result = loop.run(trainer, trainable_parameters=sum(p.numel() for p in params), layers=len(names),
                          extractor=extractor_id, bits=bits_n, mode=config.mode)
    return WatermarkRun(result=result, key=key_hex, seconds_to_99=progress["seconds_to_99"], history=history)


def watermark_shortfalls(history: list[dict], config: WatermarkConfig, bits_n: int, window: int = 5) -> list[str]:
    """The run's targets (every bit read, the decoder's images kept) against the mean of its last ``window`` steps.
    The loss is no target here: it mixes two terms whose weights the schedule moves."""
    recent = history[-window:]
    if not recent:
        return ["no step of this run was logged: bit accuracy and PSNR unknown"]
    acc = sum(h["bit_accuracy"] for h in recent) / len(recent)
    quality = sum(h["psnr"] for h in recent) / len(recent)
    missed = []
    if acc < config.stop_bit_accuracy:
        missed.append(f"bit accuracy {acc:.3f} is below {config.stop_bit_accuracy} (about {round((1 - acc) * bits_n)} "
                      f"of {bits_n} bits read wrong): train longer before relying on it")
    if quality < config.stop_psnr:
        missed.append(f"PSNR {quality:.1f} dB is below {config.stop_psnr:g} dB: images decoded with this adapter "
                      "differ visibly from the model's own")
    return missed


def _save_watermark(vae, names: list[str], full: bool, model, config: WatermarkConfig, key_hex: str, bits_n: int,
                    extractor_id: str, step: int, seconds_to_99: float | None) -> Path:
    """Write the adapter (the LoRA's layers, or the full decoder's state) with the key and run in its metadata."""
    from adapters.lora.files import LoraAdapter, LoraLayer, save_lora

    metadata = {"atelier.method": DECODER_METHOD if full else "watermark",
                "atelier.base_fingerprint": model.fingerprint,
                "atelier.watermark_bits": str(bits_n), "atelier.watermark_extractor": extractor_id,
                "atelier.watermark_key": "" if config.keep_key_secret else key_hex,
                "atelier.watermark_steps": str(step),
                "atelier.watermark_seconds_to_99": "" if seconds_to_99 is None else f"{seconds_to_99:.1f}",
                "atelier.settings": json.dumps({k: v for k, v in asdict(config).items() if k != "key"}, default=str)}
    if full:
        from core.safetensors_files import save_atomic

        trained = {f"decoder.{k}": v.detach().clone() for k, v in vae.decoder.state_dict().items()}
        return save_atomic(trained, Path(config.out), metadata)
    layers = {}
    for name, module in vae.named_modules():
        if name in names:
            lora_a = module.lora_A["watermark"].weight.detach().float().cpu()
            lora_b = module.lora_B["watermark"].weight.detach().float().cpu()
            layers[f"vae.{name}"] = LoraLayer(down=lora_a.clone(), up=lora_b.clone(), alpha=config.alpha)
    return save_lora(LoraAdapter(layers=layers, metadata=metadata), Path(config.out))


@contextmanager
def decoder_state_applied(pipe, path: Path) -> Iterator[None]:
    """A full-decoder watermark (``mode="full_decoder"``'s file) loaded into ``pipe``'s decoder for the block; the
    decoder's own weights come back exactly after."""
    from safetensors.torch import load_file

    from core.safetensors_files import read_metadata

    path = Path(path)
    if read_metadata(path).get("atelier.method") != DECODER_METHOD:
        raise UserError(f"{path.name}: not a full-decoder watermark file")
    decoder = pipe.vae.decoder
    state = {k.removeprefix("decoder."): v for k, v in load_file(str(path)).items()}
    saved = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    decoder.load_state_dict(state)
    try:
        yield
    finally:
        decoder.load_state_dict(saved)


def _remove_peft(vae) -> None:
    """Put the plain convolutions back (the base weights were never changed)."""
    for name, module in list(vae.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            parent_name, _, child = name.rpartition(".")
            setattr(vae.get_submodule(parent_name) if parent_name else vae, child, base)
    if hasattr(vae, "peft_config"):
        del vae.peft_config
