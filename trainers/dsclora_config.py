"""DSCLoRA's settings, declared once: the `train sr` command's flags are generated from them
(:mod:`core.option_fields`). Free of torch, so building the command line stays instant."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError
from core.option_fields import option


@dataclass
class DscLoraConfig:
    hr_folder: str | None = option(None, "folder of high-resolution images (LR inputs are made by bicubic downscaling)",
                                   flag="--data")
    out: str | None = option(None, "the fine-tuned upscaler, a .safetensors file")
    base: str | None = option(None, "the upscaler to start from (default: the shipped one)", flag="--model")
    teacher: str | None = option(None, "frozen teacher (default: the starting model)")
    official_pth: bool = option(False, "allow official .pth release checkpoints for --model/--teacher (tensors only)")
    steps: int = option(300, "optimizer steps (default 300)")
    batch_size: int = option(8, "patches per step (default 8)")
    patch: int = option(24, "LR patch side in pixels (default 24)")  # the HR crop is patch × scale
    lr: float = option(5e-4, "learning rate (default 5e-4)")
    # The paper does not publish its weights. The affinity term (a mean over HW×HW entries, summed over 6 blocks)
    # is about 100× the pixel L1, so 0.01 puts the three terms on one scale; a teacher far from the user's domain
    # pulls the student back, hence the small teacher weight (measured in bench/sr_benchmark.py).
    lambda_hr: float = option(1.0, "weight of L1 to the HR image (default 1)")
    lambda_teacher: float = option(0.1, "weight of L1 to the teacher (default 0.1)")
    lambda_affinity: float = option(0.01, "weight of the spatial-affinity loss (default 0.01; 0 = off)")
    rank_block: int = 2
    alpha_block: float = 4.0
    rank_tail: int = 8
    alpha_tail: float = 16.0
    seed: int = option(0, "seed (default 0)")
    checkpoint_every: int = option(100, "steps between checkpoints (default 100)")
    device: str = option("auto", "auto, cpu, cuda, mps (default auto)")

    def validate(self) -> "DscLoraConfig":
        if not self.hr_folder or not self.out:
            raise UserError("--data and --out are required (or --resume RUN_DIR)")
        if not self.out.endswith(".safetensors"):
            raise UserError("--out must name a .safetensors file")
        if self.steps < 1 or self.batch_size < 1 or self.patch < 8:
            raise UserError("steps and batch size must be ≥ 1 and the patch ≥ 8 pixels")
        if min(self.lambda_hr, self.lambda_teacher, self.lambda_affinity) < 0:
            raise UserError("loss weights must be ≥ 0")
        return self
