"""Break-for-Make's options: the PLP adapter's rank, alpha, seed and layers, and what each stage trains on.
Free of torch: the command line is built from it."""
from __future__ import annotations

from dataclasses import dataclass

from adapters.lora.config import DEFAULT_TARGETS, FORMATS
from core.errors import UserError
from core.option_fields import option


@dataclass(frozen=True)
class B4MOptions:
    rank: int = option(4, "PLP rank r (files hold rank 2r; default 4)")
    alpha: float = option(0.0, "alpha (default: = rank)")  # 0: alpha = rank (scale 1)
    # of the frozen halves; content and style runs that will be combined must share it
    seed: int = option(0, "seed of the frozen halves; runs to be combined share it (default 0)", flag="--plp-seed")
    targets: tuple[str, ...] = option(DEFAULT_TARGETS, "Linear layers to adapt, comma-separated (default "
                                                       "to_q,to_k,to_v,to_out.0)")
    # stage 1: lr of the half trained by the auxiliary sets, relative to the main lr
    other_lr_ratio: float = option(0.1, "learning rate of the auxiliary half relative to --lr (default 0.1)",
                                   flag="--aux-lr-ratio")
    preconditioned: bool = option(False, "Riemannian-preconditioned AdamW (gradients of each half scaled by the "
                                         "other's Gram inverse)")
    precondition_eps: float = 1e-6
    content: str | None = option(None, "the b4m-content run's file")  # stage 2
    style: str | None = option(None, "the b4m-style run's file")  # stage 2
    format: str = option("diffusers", "file layout (default diffusers)", choices=FORMATS)

    def validate(self) -> "B4MOptions":
        if self.rank < 1:
            raise UserError("rank must be at least 1")
        if self.format not in FORMATS:
            raise UserError(f"unknown adapter format {self.format!r} (diffusers or kohya)")
        return self

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha or self.rank)
