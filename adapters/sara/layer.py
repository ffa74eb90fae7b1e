"""A frozen Linear/Conv2d layer whose weight changes only at fixed positions: W = P₀ + scatter(δ at M).

The layer wraps the original module (as peft wraps a layer for LoRA) and owns one trainable vector ``delta`` of
length |M|. Its weight tensor is the original one, kept up to date in place (P₀[M] + δ) whenever δ has
changed, so no second copy of the weights exists.

The backward is the memory-saving one SaRA calls *unstructured backprop*: the full-size gradient of W exists only
transiently inside this layer's backward, where its masked entries are gathered into δ's gradient; the weight never
gets a ``.grad``, and the optimizer sees |M|-sized tensors only. With ``sparse_backward=False`` the same layer builds W
with ordinary autograd ops instead (a full-size weight copy and gradient per layer live for the whole step): the
baseline the memory benchmark compares against.

Merging (the :class:`~adapters.base.AdapterLayer` contract) is exact here: ``merge()`` writes P₀ + δ at every
changed position (trainable and frozen), ``unmerge()`` writes the stored P₀ values back, bit for bit. Because the
sparse forward keeps P₀[M] + δ in the weight, an unmerged layer's next forward writes it there again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterLayer, replace_modules

SUPPORTED = (nn.Linear, nn.Conv2d)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run this layer in (the input's dtype when autocast is off)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _remember(ctx, xc, weight, index, x, delta, bias) -> None:
    """What both backwards need: the (cast) input, the weight by reference, the positions and the dtypes."""
    ctx.save_for_backward(xc, weight, index)
    ctx.has_bias, ctx.x_dtype, ctx.delta_dtype = bias is not None, x.dtype, delta.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, bias, index):
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
        _remember(ctx, xc, weight, index, x, delta, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, index = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        g = grad_out.to(xc.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(xc.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            full = g.reshape(-1, g.shape[-1]).t() @ xc.reshape(-1, xc.shape[-1])  # transient, full size
            grad_delta = full.reshape(-1).index_select(0, index).to(ctx.delta_dtype)
            del full
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_delta, None, grad_bias, None


class _SparseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, bias, index, stride, padding, dilation, groups):
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(xc, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding,
                           dilation, groups)
        _remember(ctx, xc, weight, index, x, delta, bias)
        ctx.conv = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, index = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x = grad_delta = grad_bias = None
        g = grad_out.to(xc.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(xc.shape, weight.to(xc.dtype), g, stride, padding, dilation,
                                                groups).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            full = torch.nn.grad.conv2d_weight(xc, weight.shape, g, stride, padding, dilation, groups)
            grad_delta = full.reshape(-1).index_select(0, index).to(ctx.delta_dtype)
            del full
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = g.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, grad_delta, None, grad_bias, None, None, None, None, None


class SparseDeltaLayer(AdapterLayer):
    """Wraps a frozen ``nn.Linear``/``nn.Conv2d``; trains ``delta`` at ``index`` (flat positions in its weight).

    Entries frozen later (SaRA's progressive adjustment) leave ``index``/``delta`` and are kept, with their final
    delta and P₀ value, in ``frozen_index``/``frozen_delta``/``frozen_base``; the weight keeps their values (except
    after :meth:`unmerge`, until the next forward).
    """

    def __init__(self, base_layer: nn.Module, index: torch.Tensor, *, sparse_backward: bool = True) -> None:
        if not isinstance(base_layer, SUPPORTED):
            raise TypeError(f"SparseDeltaLayer wraps Linear or Conv2d, not {type(base_layer).__name__}")
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise TypeError("SparseDeltaLayer needs a Conv2d with zero padding")
        super().__init__(base_layer)
        self.sparse_backward = sparse_backward
        weight = base_layer.weight
        index = index.to(device=weight.device, dtype=_index_dtype(weight.numel()))
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("base_values", weight.detach().reshape(-1)[index].clone(), persistent=False)
        self.register_buffer("frozen_index", index[:0].clone(), persistent=False)
        self.register_buffer("frozen_delta", torch.zeros(0, device=weight.device), persistent=False)
        self.register_buffer("frozen_base", weight.detach().reshape(-1)[:0].clone(), persistent=False)
        self.delta = nn.Parameter(torch.zeros(index.numel(), device=weight.device, dtype=torch.float32))
        self._synced: tuple[int, int] | None = None
        self._frozen_written = True  # False only between unmerge() and the next write of the frozen entries

    def current_values(self) -> torch.Tensor:
        """P₀[M] + δ for the trainable entries (differentiable in δ)."""
        return self.base_values.float() + self.delta

    @torch.no_grad()
    def sync(self) -> None:
        """Write P₀[M] + δ into the weight if δ changed since the last write (the optimizer steps in place), and
        the frozen entries' values if :meth:`unmerge` took them out."""
        self._write_frozen()
        stamp = (id(self.delta), self.delta._version)
        if stamp == self._synced:
            return
        flat = self.base_layer.weight.view(-1)
        flat[self.index] = self.current_values().to(flat.dtype)
        self._synced = stamp

    @torch.no_grad()
    def _write_frozen(self) -> None:
        if self._frozen_written:
            return
        flat = self.base_layer.weight.view(-1)
        flat[self.frozen_index] = (self.frozen_base.float() + self.frozen_delta).to(flat.dtype)
        self._frozen_written = True

    def delta_weight(self) -> torch.Tensor:
        """δ (trainable and frozen) scattered into a zero tensor of the weight's shape (fp32, the weight's device)."""
        weight = self.base_layer.weight
        index, delta = self.all_entries()
        flat = torch.zeros(weight.numel(), device=weight.device, dtype=torch.float32)
        return flat.index_put((index.to(weight.device),), delta.to(weight.device)).view(weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Write P₀ + δ at every changed position (what the sparse forward keeps there anyway); repeatable."""
        self._frozen_written = False
        self._synced = None
        self.sync()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Write the stored P₀ values back at every changed position: the weight is exactly the original one.

        Unlike low-rank layers this acts even when not merged, since training already keeps δ in the weight.
        """
        flat = self.base_layer.weight.view(-1)
        flat[self.index] = self.base_values
        flat[self.frozen_index] = self.frozen_base
        self._synced = None
        self._frozen_written = False
        self.merged = False

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self.sparse_backward:
            return self._dense_forward(x)
        self.sync()
        if isinstance(base, nn.Linear):
            return _SparseLinear.apply(x, self.delta, base.weight, base.bias, self.index)
        return _SparseConv2d.apply(x, self.delta, base.weight, base.bias, self.index, base.stride, base.padding,
                                   base.dilation, base.groups)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        self._write_frozen()  # the frozen entries come from the weight
        flat = base.weight.detach().reshape(-1)
        weight = flat.index_put((self.index,), self.current_values().to(flat.dtype)).view_as(base.weight)
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        return base._conv_forward(x, weight, base.bias)

    # ------------------------------------------------------------------------------------------------ state

    def all_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position this layer changed and its delta (trainable and frozen), sorted by position."""
        index = torch.cat([self.index.long(), self.frozen_index.long()])
        delta = torch.cat([self.delta.detach().float(), self.frozen_delta.float()])
        order = torch.argsort(index)
        return index[order], delta[order]

    @torch.no_grad()
    def freeze_entries(self, keep: torch.Tensor) -> nn.Parameter:
        """Freeze the trainable entries where ``keep`` is False at their current value; returns the new ``delta``."""
        self.sync()  # the weight must hold the final values of the entries that leave
        leaving = ~keep
        self.frozen_index = torch.cat([self.frozen_index, self.index[leaving]])
        self.frozen_delta = torch.cat([self.frozen_delta, self.delta[leaving].detach().float()])
        self.frozen_base = torch.cat([self.frozen_base, self.base_values[leaving]])
        self.index = self.index[keep].clone()
        self.base_values = self.base_values[keep].clone()
        self.delta = nn.Parameter(self.delta.detach()[keep].clone())
        self._synced = None
        return self.delta


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def wrap_layers(root: nn.Module, indices: dict[str, torch.Tensor], *, sparse_backward: bool = True
                ) -> dict[str, SparseDeltaLayer]:
    """Replace each named submodule of ``root`` by a :class:`SparseDeltaLayer` with its index; returns them in
    the order of ``indices`` (the order of the optimizer's parameters)."""
    if not indices:
        return {}
    wrapped = replace_modules(root, lambda name, module: name in indices,
                              lambda name, module: SparseDeltaLayer(module, indices[name],
                                                                    sparse_backward=sparse_backward),
                              nothing_matched=f"none of the {len(indices)} layers to wrap is in the model")
    missing = [name for name in indices if name not in wrapped]
    if missing:
        raise ValueError(f"no wrappable submodule named {', '.join(missing)}")
    return {name: wrapped[name] for name in indices}
