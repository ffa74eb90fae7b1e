"""One wrapper contract and one replace loop for the studio's own adapter layers (PLP, SaRA, ConvLoRA).

The contract follows peft's ``BaseTunerLayer`` so code that walks a network treats our layers and peft's alike: the
wrapped module is ``base_layer``; ``weight``/``bias`` read through to it (diffusers reads ``.weight.dtype/.device``
of projections); ``delta_weight()`` is the dense ΔW; ``merge()``/``unmerge()`` fold it into the base weight and back,
and a merged layer runs as the plain base layer.
"""
from __future__ import annotations

import abc
from typing import Callable, Iterable

import torch
from torch import nn


class AdapterLayer(nn.Module, abc.ABC):
    """A frozen ``base_layer`` plus a learned change of its weight.

    Subclasses give the adapted forward (:meth:`adapter_forward`) and the dense change (:meth:`delta_weight`);
    merging adds that change into the base weight in place, so a merged network costs what the plain one costs.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False  # True: the base weight holds the change and forward is the base layer's

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def scaling(self) -> float:
        """The factor the learned product is multiplied by (α/r for low-rank layers); 1.0 when there is none."""
        return 1.0

    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped module (adapters may wrap adapters)."""
        layer = self.base_layer
        while isinstance(layer, AdapterLayer):
            layer = layer.base_layer
        return layer

    @abc.abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """ΔW in the base weight's shape, scaling included: the adapted layer is the base layer with W + ΔW."""

    @abc.abstractmethod
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted forward while unmerged (training and unmerged inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return self.adapter_forward(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight (cast to its dtype and device); a second call does nothing."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight += self.delta_weight().to(dtype=weight.dtype, device=weight.device)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW again (exact up to rounding in the weight's dtype); does nothing unless merged."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight -= self.delta_weight().to(dtype=weight.dtype, device=weight.device)
        self.merged = False


def name_matches(name: str, targets: Iterable[str]) -> bool:
    """``name`` is a target or ends with ``"." + target`` (``"to_out.0"`` matches ``"...attn1.to_out.0"``)."""
    return any(name == target or name.endswith("." + target) for target in targets)


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` (``setattr`` also replaces ``nn.Sequential``'s "0", "1", … children)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _outermost(root: nn.Module, keep: Callable[[str, nn.Module], bool], *,
               skip_adapters: bool) -> list[tuple[str, nn.Module]]:
    """Submodules (not ``root``) for which ``keep`` holds, in module order, none inside another (nor inside an
    adapter, with ``skip_adapters``)."""
    found: list[tuple[str, nn.Module]] = []
    closed: list[str] = []  # prefixes whose insides are not looked at
    for name, module in root.named_modules():
        if not name or any(name.startswith(prefix) for prefix in closed):
            continue
        if keep(name, module):
            found.append((name, module))
            closed.append(name + ".")
        elif skip_adapters and isinstance(module, AdapterLayer):
            closed.append(name + ".")
    return found


def replace_modules(root: nn.Module, select: Callable[[str, nn.Module], bool],
                    make: Callable[[str, nn.Module], AdapterLayer], *,
                    nothing_matched: str | None = None) -> dict[str, AdapterLayer]:
    """Wrap every submodule ``select(name, module)`` picks with ``make(name, module)``; returns name → wrapper.

    Modules are visited (and ``make`` called, which matters for wrappers drawing random numbers) in
    ``named_modules`` order. Already wrapped layers and the insides of a picked module are not considered, so
    attaching twice does not wrap a wrapper. Raises ``ValueError`` (``nothing_matched``, or one naming ``select``)
    when nothing is picked: a rule that matches nothing is a mistake, not an empty adapter.
    """
    chosen = _outermost(root, lambda name, module: not isinstance(module, AdapterLayer) and select(name, module),
                        skip_adapters=True)
    if not chosen:
        rule = getattr(select, "__qualname__", repr(select))
        raise ValueError(nothing_matched or f"no submodule of {type(root).__name__} matches the rule {rule}")
    wrapped: dict[str, AdapterLayer] = {}
    for name, module in chosen:
        wrapper = make(name, module)
        _set_child(root, name, wrapper)
        wrapped[name] = wrapper
    return wrapped


def restore_modules(root: nn.Module, *, merge: bool, kind: type[AdapterLayer] = AdapterLayer) -> nn.Module:
    """Put every adapter's (of type ``kind``) base layer back; returns ``root`` (its base layer if ``root`` is one).

    ``merge=True`` merges first, leaving a plain network that computes what the adapted one did;
    ``merge=False`` unmerges, leaving the base weights as they were before the adapters came.
    """
    def finish(layer: AdapterLayer) -> nn.Module:
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        return layer.base_layer

    if isinstance(root, kind):
        return finish(root)
    for name, layer in _outermost(root, lambda name, module: isinstance(module, kind), skip_adapters=False):
        _set_child(root, name, finish(layer))
    return root
