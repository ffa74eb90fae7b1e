"""SPAN (swift parameter-free attention network) for super-resolution, in training and folded form.

Every Conv3XC is a 1×1 expansion → 3×3 → 1×1 projection plus a 1×1 skip. All four are linear, and the input is
zero-padded *before* the first 1×1 conv (so its bias reaches the border taps too), which makes the whole branch
fold exactly into one 3×3 conv: ``reparameterize()`` does that, and folded checkpoints (the official release
layout: ``*.eval_conv.*``) load straight into the folded form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass(frozen=True)
class SpanConfig:
    channels: int = 26  # 26: the DSCF size (≈131 K parameters); 48: SPAN's paper size
    scale: int = 4  # 2, 3 or 4
    blocks: int = 6
    gain: int = 2
    in_channels: int = 3
    out_channels: int = 3
    img_range: float = 255.0

    def __post_init__(self) -> None:
        if self.scale not in (2, 3, 4):
            raise ValueError(f"scale must be 2, 3 or 4 (got {self.scale})")
        if self.blocks != 6:
            raise ValueError("SPAN has 6 blocks (block 1 and block 6 feed the final concatenation)")


class Conv3XC(nn.Module):
    """A 3×3 conv trained as 1×1 → 3×3 → 1×1 (+ 1×1 skip); ``fold()`` turns it into the single ``eval_conv``."""

    def __init__(self, c_in: int, c_out: int, gain: int = 2) -> None:
        super().__init__()
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_in * gain, 1), nn.Conv2d(c_in * gain, c_out * gain, 3),
                                  nn.Conv2d(c_out * gain, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.eval_conv.requires_grad_(False)
        self.folded = False

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1, w2, w3 = (m.weight for m in self.conv)
        b1, b2, b3 = (m.bias for m in self.conv)
        w1, w3 = w1[:, :, 0, 0], w3[:, :, 0, 0]
        weight = torch.einsum("om,mnhw,ni->oihw", w3, w2, w1)
        bias = w3 @ (torch.einsum("mnhw,n->m", w2, b1) + b2) + b3
        weight = weight.clone()
        weight[:, :, 1, 1] += self.sk.weight[:, :, 0, 0]
        return weight, bias + self.sk.bias

    @torch.no_grad()
    def fold(self) -> None:
        weight, bias = self.folded_weights()
        self.eval_conv.weight.copy_(weight)
        self.eval_conv.bias.copy_(bias)
        self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self.eval_conv(x)
        return self.conv(F.pad(x, (1, 1, 1, 1))) + self.sk(x)


class SPAB(nn.Module):
    """Three Conv3XC with SiLU between them and the parameter-free attention (σ(h3) − ½)."""

    def __init__(self, channels: int, gain: int = 2) -> None:
        super().__init__()
        self.c1_r = Conv3XC(channels, channels, gain)
        self.c2_r = Conv3XC(channels, channels, gain)
        self.c3_r = Conv3XC(channels, channels, gain)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, SiLU(h1)); the latter is what the released model concatenates from block 6."""
        h1 = F.silu(self.c1_r(x))
        h3 = self.c3_r(F.silu(self.c2_r(h1)))
        attention = torch.sigmoid(h3) - 0.5
        return (h3 + x) * attention, h1


class SPAN(nn.Module):
    def __init__(self, config: SpanConfig = SpanConfig()) -> None:
        super().__init__()
        c, s = config.channels, config.scale
        self.config = config
        self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_1 = Conv3XC(config.in_channels, c, config.gain)
        for i in range(1, config.blocks + 1):
            self.add_module(f"block_{i}", SPAB(c, config.gain))
        self.conv_cat = nn.Conv2d(4 * c, c, 1)
        self.conv_2 = Conv3XC(c, c, config.gain)
        self.upsampler = nn.Sequential(nn.Conv2d(c, config.out_channels * s * s, 3, padding=1), nn.PixelShuffle(s))

    @property
    def blocks(self) -> list[SPAB]:
        return [getattr(self, f"block_{i}") for i in range(1, self.config.blocks + 1)]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """RGB in [0, 1] → RGB in [0, 1] (about), ``scale`` times larger; optionally each block's output too."""
        x = (x - self.mean.to(x)) * self.config.img_range
        first = self.conv_1(x)
        out, features, h1 = first, [], None
        for block in self.blocks:
            out, h1 = block(out)
            features.append(out)
        last = self.conv_2(out)
        fused = self.conv_cat(torch.cat([first, last, features[0], h1], dim=1))
        image = self.upsampler(fused)
        return (image, features) if return_features else image

    def conv3xc_modules(self) -> list[Conv3XC]:
        return [m for m in self.modules() if isinstance(m, Conv3XC)]

    def reparameterize(self) -> "SPAN":
        """Fold every Conv3XC into its single 3×3 conv (exact); the network is then the release's layout."""
        for module in self.conv3xc_modules():
            module.fold()
        return self

    @property
    def is_folded(self) -> bool:
        return all(m.folded for m in self.conv3xc_modules())

    def folded_state_dict(self) -> dict[str, torch.Tensor]:
        """The official (re-parameterised) key layout: ``*.eval_conv.*``, ``conv_cat.*``, ``upsampler.0.*``."""
        if not self.is_folded:
            raise RuntimeError("reparameterize() first")
        return {k: v for k, v in self.state_dict().items()
                if ".eval_conv." in k or k.startswith(("conv_cat.", "upsampler."))}


def num_parameters(model: nn.Module, folded: bool = True) -> int:
    """Parameters of the inference network (folded convs only) or of the training form."""
    if folded:
        return sum(v.numel() for k, v in model.state_dict().items()
                   if ".eval_conv." in k or k.startswith(("conv_cat.", "upsampler.")))
    return sum(p.numel() for n, p in model.named_parameters() if ".eval_conv." not in n)
