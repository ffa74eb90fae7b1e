"""SaRA's options: which weights the sparse delta covers (a budget or a threshold θ) and how it is regularised.
Free of torch: the command line and the Train tab are built from it."""
from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import UserError
from core.option_fields import option

METHOD = "sara"  # atelier.method of a SaRA file
SHAPES_KEY = "atelier.sara_shapes"  # metadata key every SaRA file has: each changed weight's shape


def is_sara_metadata(meta) -> bool:
    """A SaRA file says so in its metadata (its method and the shapes of the weights it changes)."""
    return meta.get("atelier.method") == METHOD and SHAPES_KEY in meta


@dataclass(frozen=True)
class SaraOptions:
    budget: str | None = option(None, "trainable weights: a share (5%) or a count (50M, 120k); default 5%",
                                label="Budget (share 5% or count 50M)", ui=True, ui_default="5%", group="selection")
    threshold: float | None = option(None, "train every weight with |w| < θ", label="Threshold θ (0 = use the budget)",
                                     ui=True, ui_default=0, minimum=0, step=1e-4, group="selection")
    lambda_rank: float = option(5e-3, "nuclear-norm weight λ (default 5e-3; 0 = off)", label="λ rank (0 = off)",
                                ui=True, minimum=0, step=1e-3)  # the paper's λ
    progressive: float = option(0.5, "fraction of training after which grown weights freeze (default 0.5; 0 = off)",
                                label="Progressive fraction (0 = off)", ui=True, minimum=0, maximum=0.99, step=0.05)
    rank_layers_per_step: int = option(1, "layers rank-regularised per step (default 1)")
    min_rank_side: int = 64  # matrices whose smaller side is at most this are not rank-regularised
    sparse_backward: bool = True  # False: plain autograd through a full-size weight (benchmark baseline)

    def validate(self) -> "SaraOptions":
        if self.budget is not None and self.threshold is not None:
            raise UserError("give either a budget or a threshold, not both")
        if self.threshold is not None and not self.threshold > 0:
            raise UserError("the threshold must be positive")
        if self.budget is not None:
            parse_budget(self.budget, 10**12)  # raises on nonsense
        if self.lambda_rank < 0:
            raise UserError("λ (lambda-rank) must be ≥ 0")
        if not 0.0 <= self.progressive < 1.0:
            raise UserError("the progressive fraction must be in [0, 1)")
        if self.rank_layers_per_step < 0:
            raise UserError("rank layers per step must be ≥ 0")
        return self


# ------------------------------------------------------------------------------------------- trainable set


def parse_budget(text: str, total: int) -> int:
    """``"5%"`` → 5 % of ``total``; ``"50M"``/``"1.5k"``/``"120000"`` → that count (at most ``total``)."""
    raw = str(text).strip().replace(" ", "").replace("_", "")
    match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(%|[kKmMgGbB]?)", raw)
    if not match:
        raise UserError(f"budget {text!r}: write a share such as 5% or a count such as 50M")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if not 0 < number <= 100:
            raise UserError(f"budget {text!r}: a share must be in (0, 100] %")
        count = number / 100.0 * total
    else:
        count = number * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}[unit.lower()]
    if count < 1:
        raise UserError(f"budget {text!r} selects no weights")
    return min(int(round(count)), total)
