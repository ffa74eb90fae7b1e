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

from adapters.base import AdapterLayer


class ConvLoRA(AdapterLayer):
    """A frozen ``nn.Conv2d`` (``base_layer``) plus (α/r)·B·A reshaped to its kernel; merge/unmerge from
    :class:`~adapters.base.AdapterLayer`."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        if rank < 1:
            raise ValueError("ConvLoRA rank must be at least 1")
        super().__init__(base)
        k = base.kernel_size[0]
        base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(rank * k, base.in_channels * k, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_channels * k, rank * k, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def base(self) -> nn.Conv2d:
        """The wrapped conv under its former name (state_dict keys say ``base_layer``)."""
        return self.base_layer

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def scaling(self) -> float:
        return self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.base_layer.weight.shape) * self.scale

    def delta(self) -> torch.Tensor:
        """Alias of :meth:`delta_weight`."""
        return self.delta_weight()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return F.conv2d(x, b.weight + self.delta_weight().to(b.weight), b.bias, b.stride, b.padding, b.dilation,
                        b.groups)
