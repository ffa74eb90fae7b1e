"""The watermark LoRA's settings, declared once: the flags of `watermark train` (and of its alias `train watermark`)
are generated from them (:mod:`core.option_fields`). Free of torch, so building the command line stays instant."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError
from core.option_fields import option

MODES = ("lora", "full_decoder")


@dataclass
class WatermarkConfig:
    out: str | None = option(None, "the adapter .safetensors file (required unless --resume)")
    # pipeline folder / checkpoint (default: the studio's default model)
    model: str | None = option(None, "base model (default: the embedded model)")
    key: str | None = option(None, "hex key (default: a fresh random one, printed)")  # None draws a fresh key
    keep_key_secret: bool = option(False, "do not store the key in the file's metadata", flag="--secret")
    extractor: str | None = option(None, "extractor file (default: the shipped one)")
    # "lora" (the watermark LoRA) or "full_decoder" (every decoder parameter: Stable Signature)
    mode: str = option("lora", "lora (default): the watermark LoRA; full_decoder: fine-tune every decoder weight (the "
                               "Stable Signature baseline; writes the decoder's state, not an adapter)", choices=MODES)
    rank: int = option(4, "LoRA rank (default 4)")
    alpha: float = option(32.0, "LoRA alpha (default 32)")
    lr: float = option(1e-3, "learning rate (default 1e-3)")
    batch_size: int = 4
    max_steps: int = option(800, "maximum steps (training stops early on its targets; default 800)", flag="--steps")
    # latents sampled from the base model (when no image folder is given)
    latents: int = option(64, "latents sampled from the model to train on (default 64)")
    images: str | None = option(None, "folder of images whose latents to train on (default: samples of the model)")
    prompts: tuple[str, ...] = ()  # prompts for sampled latents (default: micro-world captions)
    sample_steps: int = 20
    # Share of steps whose x̃ passes the noise layer before the extractor. Off by default: extractor v1 does not
    # survive JPEG, resizing or blur anyway, and training through them only cost image quality.
    noise_probability: float = option(0.0, "share of steps trained through the noise layer (default 0)",
                                      flag="--noise")
    # dynamic loss-weight scheduler (extended paper), with a PSNR floor the images never go below for long
    psnr_floor: float = option(31.0, "PSNR (dB) under which image quality comes first, whatever the bits read "
                                     "(default 31: a margin over the 30 dB target; 0 = the paper's schedule alone)")
    bit_target: float = 0.9
    psnr_target: float = 30.0
    gamma: float = 0.25
    patience: int = 5
    bit_target_step: float = 0.08
    bit_target_cap: float = 0.99
    psnr_target_step: float = 2.5
    # early stop: both final targets met this many consecutive steps
    stop_bit_accuracy: float = 0.99
    stop_psnr: float = 30.0
    patience_stop: int = 10
    seed: int = 0
    checkpoint_every: int = option(100, "steps between checkpoints (default 100)")
    device: str = option("auto", "auto, cpu, cuda, mps (default auto)")

    def validate(self) -> "WatermarkConfig":
        if not self.out:
            raise UserError("--out is required (or --resume RUN_DIR)")
        if not str(self.out).endswith(".safetensors"):
            raise UserError("--out must name a .safetensors file")
        if min(self.rank, self.batch_size, self.max_steps, self.latents, self.checkpoint_every) < 1:
            raise UserError("rank, batch size, steps, latents and the checkpoint interval must be ≥ 1")
        if not 0 <= self.noise_probability <= 1:
            raise UserError("the noise probability must be between 0 and 1")
        if self.mode not in MODES:
            raise UserError(f"unknown watermark training mode {self.mode!r} (choose {' or '.join(MODES)})")
        return self
