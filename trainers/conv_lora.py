"""ConvLoRA: a low-rank update of a k×k convolution kernel, with the peft-style merge/unmerge contract.

A ∈ R^{(r·k) × (C_in·k)} (Kaiming init) and B ∈ R^{(C_out·k) × (r·k)} (zero init, so training starts from the
pretrained network); ΔW = (α/r)·reshape(B·A) to the kernel's shape. Merged, the network has exactly the size and
speed of the plain one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvLoRA(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("ConvLoRA rank must be at least 1")
        k = base.kernel_size[0]
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(rank * k, base.in_channels * k, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels * k, rank * k, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.base.weight.shape) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        b = self.base
        return F.conv2d(x, b.weight + self.delta().to(b.weight), b.bias, b.stride, b.padding, b.dilation, b.groups)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight)
            self.merged = False
