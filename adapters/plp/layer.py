"""The PLP ("partly learnable projection") adapter of Break-for-Make, as a peft-style Linear wrapper.

ΔW = s·U·D with U = [A; B] (rows split at m/2) and D = [C | E] (columns split at n/2). A and C are frozen orthonormal
draws from a seed kept in the adapter file, so a content run and a style run share them bit for bit and their
trainable halves B and E can be recombined. The frozen×frozen block A·C is left out (it would perturb the base at
step 0 and carries nothing learned):

    ΔW = s·[[0, A·E], [B·C, B·E]]        (ΔW = 0 while B = E = 0)

which is the rank ≤ 2r product up'·down' with up' = [U, [0; B]] and down' = [[0 | E]; [C | 0]] — the form files use.
A and C are buffers, never parameters: no optimizer (or its weight decay) can move them.

Conv2d layers (LoCon-style, for models where attention alone is too little) split their *input channels* the same
way: D is an r-channel convolution with the layer's kernel, U a 1×1 convolution, so files hold ordinary conv LoRAs.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterLayer, name_matches, replace_modules, restore_modules

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _layer_seed(seed: int, name: str, part: str) -> int:
    """A 63-bit seed for one frozen part of one layer: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}:{name}:{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def orthonormal_columns(rows: int, cols: int, seed: int) -> torch.Tensor:
    """``cols`` orthonormal columns of a random orthogonal ``rows``×``rows`` matrix (fp32, CPU, deterministic)."""
    if cols > rows:
        raise ValueError(f"cannot draw {cols} orthonormal columns of length {rows}")
    gen = torch.Generator("cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # the sign fix makes the draw unique (Haar)


def frozen_parts(name: str, out_features: int, in_features: int, rank: int, seed: int,
                 kernel: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A (⌊m/2⌋ × r, orthonormal columns) and C (r × ⌊n/2⌋·kernel, orthonormal rows) of layer ``name``
    (``in_features``: input channels of a conv, whose ``kernel`` = kh·kw values per channel)."""
    top, left = out_features // 2, (in_features // 2) * kernel
    if rank > min(top, left):
        raise ValueError(f"{name}: rank {rank} is more than half the layer's smaller side "
                         f"({out_features}×{in_features}); use rank ≤ {min(top, left)}")
    a = orthonormal_columns(top, rank, _layer_seed(seed, name, "up"))
    c = orthonormal_columns(left, rank, _layer_seed(seed, name, "down")).T.contiguous()
    return a, c


class PLPLinear(AdapterLayer):
    """A frozen ``nn.Linear`` or ``nn.Conv2d`` plus the PLP update. ``up_trainable`` is B, ``down_trainable`` is E
    (for a conv, E's columns are input channel × kernel position, channel-major as in the weight)."""

    def __init__(self, base: nn.Linear | nn.Conv2d, name: str, rank: int, alpha: float, seed: int) -> None:
        super().__init__(base)
        self.name = name
        self.rank = rank
        self.scale = float(alpha) / rank
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            if base.groups != 1 or base.padding_mode != "zeros":
                raise ValueError(f"{name}: grouped or non-zero-padded convolutions are not supported")
            m, n = base.out_channels, base.in_channels
            self.kernel = tuple(base.kernel_size)
        else:
            m, n = base.out_features, base.in_features
            self.kernel = (1, 1)
        k = self.kernel[0] * self.kernel[1]
        self.top, self.left = m // 2, n // 2  # rows of A; input channels C reads
        a, c = frozen_parts(name, m, n, rank, seed, kernel=k)
        device = base.weight.device
        self.register_buffer("up_frozen", a.to(device), persistent=False)
        self.register_buffer("down_frozen", c.to(device), persistent=False)
        self.up_trainable = nn.Parameter(torch.zeros(m - self.top, rank, device=device))
        self.down_trainable = nn.Parameter(torch.zeros(rank, (n - self.left) * k, device=device))
        # Which trainable half the current forward may send gradient to (Break-for-Make routes each loss to one).
        self.grad_to_up = True
        self.grad_to_down = True

    @property
    def scaling(self) -> float:
        return self.scale

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        b = self.up_trainable if self.grad_to_up else self.up_trainable.detach()
        e = self.down_trainable if self.grad_to_down else self.down_trainable.detach()
        h = x.to(e.dtype)
        c, a = self.down_frozen.to(e.dtype), self.up_frozen.to(e.dtype)
        if self.is_conv:
            conv = self.base_layer
            kh, kw = self.kernel

            def down(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                return F.conv2d(inp, weight.reshape(self.rank, -1, kh, kw), None, conv.stride, conv.padding,
                                conv.dilation)

            def up(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                return F.conv2d(inp, weight[:, :, None, None])

            right, left = down(h[:, self.left:], e), down(h[:, :self.left], c)
            delta = torch.cat([up(right, a), up(left + right, b)], dim=1)
        else:
            right = F.linear(h[..., self.left:], e)  # E·x_right
            left = F.linear(h[..., :self.left], c)  # C·x_left
            delta = torch.cat([F.linear(right, a), F.linear(left + right, b)], dim=-1)  # [A·E·x_r ; B·(C·x_l + E·x_r)]
        return out + (self.scale * delta).to(out.dtype)

    def export_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down', up') of the rank-2r form, fp32 on the CPU, shaped as a LoRA file holds them (conv: 4-D)."""
        a, c = self.up_frozen.float().cpu(), self.down_frozen.float().cpu()
        b, e = self.up_trainable.detach().float().cpu(), self.down_trainable.detach().float().cpu()
        down, up = plp_export(a, b, c, e)
        if self.is_conv:
            return down.reshape(2 * self.rank, -1, *self.kernel), up[:, :, None, None]
        return down, up

    def delta_weight(self) -> torch.Tensor:
        """s·up'·down' in the base weight's shape (fp32, on the CPU like :meth:`export_pair`)."""
        down, up = self.export_pair()
        return (self.scale * up.flatten(1) @ down.flatten(1)).reshape(self.base_layer.weight.shape)


def plp_export(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """down' = [[0 | E]; [C | 0]] and up' = [[A; B], [0; B]] (rank 2r) with up'·down' = [[0, A·E], [B·C, B·E]]."""
    r = a.shape[1]
    top, bottom = a.shape[0], b.shape[0]
    left, right = c.shape[1], e.shape[1]
    down = torch.zeros(2 * r, left + right)
    down[:r, left:] = e
    down[r:, :left] = c
    up = torch.zeros(top + bottom, 2 * r)
    up[:top, :r] = a
    up[top:, :r] = b
    up[top:, r:] = b
    return down, up


@dataclass
class PLPHalves:
    """What one layer of a PLP file holds, recovered from its rank-2r form."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    e: torch.Tensor
    scale: float


def plp_halves(down: torch.Tensor, up: torch.Tensor, scale_in_up: float = 1.0) -> PLPHalves:
    """Invert :func:`plp_export` (``scale_in_up``: a factor some formats fold into ``up``; divided back out).
    Conv layers (4-D ``down``) split at half their input channels."""
    two_r, channels = down.shape[:2]
    kernel = down[0, 0].numel()
    m = up.shape[0]
    if two_r % 2 or up.shape[1] != two_r:
        raise ValueError("not a PLP layer: the rank is not even or down/up disagree")
    r, top, left = two_r // 2, m // 2, (channels // 2) * kernel
    up = up.float().flatten(1) / scale_in_up
    down = down.float().flatten(1)
    return PLPHalves(a=up[:top, :r], b=up[top:, r:], c=down[r:, :left], e=down[:r, left:], scale=1.0)


def attach_plp(root: nn.Module, rank: int, alpha: float, seed: int,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, PLPLinear]:
    """Replace every ``nn.Linear``/``nn.Conv2d`` whose name ends with a target by a :class:`PLPLinear`; freeze
    everything else."""
    root.requires_grad_(False)
    return replace_modules(
        root, lambda name, module: isinstance(module, (nn.Linear, nn.Conv2d)) and name_matches(name, targets),
        lambda name, module: PLPLinear(module, name, rank, alpha, seed),
        nothing_matched=f"no Linear or Conv2d layer matches the targets {', '.join(targets)}")


def detach_plp(root: nn.Module) -> None:
    """Put the original layers back, unmerged (the base weights were never touched)."""
    restore_modules(root, merge=False, kind=PLPLinear)


@contextmanager
def gradient_route(layers: dict[str, PLPLinear], up: bool, down: bool):
    """Within the block, forwards send gradient only to the chosen trainable halves."""
    saved = [(layer.grad_to_up, layer.grad_to_down) for layer in layers.values()]
    for layer in layers.values():
        layer.grad_to_up, layer.grad_to_down = up, down
    try:
        yield
    finally:
        for layer, (u, d) in zip(layers.values(), saved):
            layer.grad_to_up, layer.grad_to_down = u, d


@torch.no_grad()
def precondition_gradients(layers: dict[str, PLPLinear], eps: float = 1e-6) -> None:
    """Riemannian preconditioning of the trainable halves' gradients (in place, before the optimizer step).

    The up gradient is multiplied by (D·Dᵀ + εI)⁻¹ on the right, the down gradient by (UᵀU + εI)⁻¹ on the left, with
    the full factors U = [A; B] and D = [C | E] and only the trainable rows/columns of each gradient touched.
    """
    for layer in layers.values():
        b, e = layer.up_trainable, layer.down_trainable
        eye = torch.eye(layer.rank, device=e.device, dtype=torch.float32)
        if b.grad is not None:
            d = torch.cat([layer.down_frozen.float(), e.float()], dim=1)
            b.grad.copy_(torch.linalg.solve(d @ d.T + eps * eye, b.grad.float().T).T.to(b.grad.dtype))
        if e.grad is not None:
            u = torch.cat([layer.up_frozen.float(), b.float()], dim=0)
            e.grad.copy_(torch.linalg.solve(u.T @ u + eps * eye, e.grad.float()).to(e.grad.dtype))
