"""The AdapterLayer contract on each of the studio's layers (PLP, SaRA, ConvLoRA), and the one replace/restore loop."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterLayer, name_matches, replace_modules, restore_modules
from adapters.conv_lora.layer import ConvLoRA
from adapters.plp.layer import PLPLinear
from adapters.sara.layer import SparseDeltaLayer


def _randomise(layer: AdapterLayer, seed: int = 0) -> None:
    """Non-zero trainable tensors, so ΔW ≠ 0 and every comparison below can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _plp_linear() -> AdapterLayer:
    return PLPLinear(nn.Linear(12, 10), "blocks.0.to_q", rank=3, alpha=6.0, seed=1)


def _plp_conv() -> AdapterLayer:
    return PLPLinear(nn.Conv2d(6, 8, 3, padding=1), "res.conv1", rank=2, alpha=2.0, seed=2)


def _sara(base: nn.Module, sparse_backward: bool) -> Callable[[], AdapterLayer]:
    def make() -> AdapterLayer:
        index = torch.randperm(base.weight.numel(), generator=torch.Generator().manual_seed(3))[:40]
        return SparseDeltaLayer(base, index, sparse_backward=sparse_backward)
    return make


def _conv_lora() -> AdapterLayer:
    return ConvLoRA(nn.Conv2d(6, 8, 3, padding=1), rank=2, alpha=4.0)


LAYERS = {
    "plp-linear": _plp_linear,
    "plp-conv": _plp_conv,
    "sara-sparse-linear": lambda: _sara(nn.Linear(12, 10), True)(),
    "sara-dense-conv": lambda: _sara(nn.Conv2d(6, 8, 3, padding=1), False)(),
    "sara-sparse-conv": lambda: _sara(nn.Conv2d(6, 8, 3, padding=1), True)(),
    "conv-lora": _conv_lora,
}


def _made(kind: str) -> tuple[AdapterLayer, torch.Tensor, torch.Tensor]:
    """(randomised layer, its base weight P₀ as built, an input)."""
    torch.manual_seed(7)
    layer = LAYERS[kind]()
    original = layer.weight.detach().clone()
    _randomise(layer)
    base = layer.get_base_layer()
    x = torch.randn(4, 12) if isinstance(base, nn.Linear) else torch.randn(2, 6, 7, 7)
    return layer, original, x


def _base_forward(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)


def _is_exact(layer: AdapterLayer) -> bool:
    return isinstance(layer, SparseDeltaLayer)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_unmerged_merged_and_dense_delta_forwards_agree(kind):
    layer, original, x = _made(kind)
    base = layer.get_base_layer()
    with torch.no_grad():
        plain = _base_forward(base, original, x)
        expected = _base_forward(base, original + layer.delta_weight().to(original), x)
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        merged = layer(x)
    assert (unmerged - plain).abs().max() > 1e-3  # the adapter does change the layer
    torch.testing.assert_close(unmerged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_then_unmerge_restores_the_base_weight(kind):
    layer, original, x = _made(kind)
    with torch.no_grad():
        layer(x)  # SaRA's sparse forward writes P₀ + δ into the weight: unmerge must undo that too
        layer.merge()
        torch.testing.assert_close(layer.weight, original + layer.delta_weight().to(original), rtol=0, atol=1e-6)
        assert not torch.equal(layer.weight, original)
        layer.unmerge()
    assert not layer.merged
    if _is_exact(layer):
        assert torch.equal(layer.weight, original)
    else:
        torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_is_idempotent(kind):
    layer, original, _ = _made(kind)
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once) and layer.merged
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=0 if _is_exact(layer) else 1e-6)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_bias_and_base_layer_read_through(kind):
    layer, _, _ = _made(kind)
    base = layer.base_layer
    assert layer.get_base_layer() is base
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.delta_weight().shape == base.weight.shape
    expected_scaling = {"plp-linear": 2.0, "plp-conv": 1.0, "conv-lora": 2.0}.get(kind, 1.0)
    assert layer.scaling == expected_scaling
    if isinstance(layer, ConvLoRA):
        torch.testing.assert_close(layer.delta_weight(), 2.0 * (layer.lora_B @ layer.lora_A).view(base.weight.shape))


@pytest.mark.parametrize("kind", ["sara-sparse-linear", "sara-dense-conv"])
def test_sara_unmerged_forward_puts_its_delta_back(kind):
    """After an unmerge (weight exactly P₀) the layer still computes P₀ + δ, frozen entries included."""
    layer, original, x = _made(kind)
    layer.freeze_entries(torch.arange(layer.delta.numel()) % 2 == 0)
    with torch.no_grad():
        expected = _base_forward(layer.base_layer, original + layer.delta_weight(), x)
        layer.unmerge()
        assert torch.equal(layer.weight, original)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


class _Doubled(AdapterLayer):
    """The least adapter: twice the base output (enough to see what was wrapped)."""

    def delta_weight(self) -> torch.Tensor:
        return self.weight.detach().clone()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.base_layer(x)


class _Toy(nn.Module):
    """Convs at the top level and inside a Sequential, a Linear inside another."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.Linear(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))


def _adapt(name: str, module: nn.Module) -> AdapterLayer:
    if isinstance(module, nn.Linear):
        return PLPLinear(module, name, rank=2, alpha=2.0, seed=0)
    if name == "body.2":
        index = torch.randperm(module.weight.numel(), generator=torch.Generator().manual_seed(1))[:20]
        return SparseDeltaLayer(module, index)
    return ConvLoRA(module, rank=2, alpha=4.0)


def _adapted_toy() -> tuple[_Toy, dict[str, AdapterLayer], dict[str, nn.Module], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = _Toy()
    originals = dict(net.named_modules())
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    layers = replace_modules(net, lambda name, module: isinstance(module, (nn.Linear, nn.Conv2d))
                             and name_matches(name, ("0", "2", "stem")), _adapt)
    for i, layer in enumerate(layers.values()):
        _randomise(layer, seed=i)
    return net, layers, originals, weights


def test_name_matches():
    assert name_matches("down.attn1.to_out.0", ("to_q", "to_out.0"))
    assert name_matches("to_q", ("to_q",))
    assert not name_matches("down.attn1.xto_q", ("to_q",))
    assert not name_matches("down.attn1.to_out.0.bias", ("to_out.0",))


def test_replace_modules_wraps_nested_and_sequential_children():
    net, layers, originals, _ = _adapted_toy()
    assert list(layers) == ["stem", "body.0", "body.2", "head.0"]  # module order
    assert net.body[0] is layers["body.0"] and net.head[0] is layers["head.0"] and net.stem is layers["stem"]
    assert isinstance(net.body[1], nn.ReLU)
    assert [type(layers[n]) for n in layers] == [ConvLoRA, ConvLoRA, SparseDeltaLayer, PLPLinear]
    for name, layer in layers.items():
        assert layer.base_layer is originals[name]
    # Wrappers and their insides are not picked again: the same rule now matches nothing.
    with pytest.raises(ValueError, match="rule"):
        replace_modules(net, lambda name, module: isinstance(module, (nn.Linear, nn.Conv2d)), _adapt)
    with pytest.raises(ValueError, match="nothing for you"):
        replace_modules(net, lambda name, module: False, _adapt, nothing_matched="nothing for you")


def test_replace_modules_wraps_the_outer_of_nested_picks():
    net = _Toy()
    inner = net.body[0]
    layers = replace_modules(net, lambda name, module: name in ("body", "body.0"),
                             lambda name, module: _Doubled(module))
    assert list(layers) == ["body"] and net.body.base_layer[0] is inner


def test_restore_unmerged_gives_back_the_very_same_untouched_modules():
    net, layers, originals, weights = _adapted_toy()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        net(x)  # moves SaRA's delta into its weight
    layers["stem"].merge()  # a merged layer is unmerged on the way out
    assert restore_modules(net, merge=False) is net
    assert not any(isinstance(m, AdapterLayer) for m in net.modules())
    for name in layers:
        assert net.get_submodule(name) is originals[name]
    state = net.state_dict()
    assert list(state) == list(weights)
    for key, value in weights.items():
        exact = key.startswith("body.2.")
        torch.testing.assert_close(state[key], value, rtol=0, atol=0 if exact else 1e-6)


def test_restore_merged_gives_a_plain_network_computing_the_adapted_one():
    net, layers, _, weights = _adapted_toy()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        adapted = net(x)
        plain = restore_modules(net, merge=True)
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert list(plain.state_dict()) == list(weights)
        out = plain(x)
        torch.manual_seed(0)
        untouched = _Toy()(x)
    assert (adapted - untouched).abs().max() > 1e-4
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5)


def test_restore_only_the_asked_kind():
    net, layers, originals, _ = _adapted_toy()
    restore_modules(net, merge=False, kind=ConvLoRA)
    assert net.stem is originals["stem"] and net.body[0] is originals["body.0"]
    assert net.body[2] is layers["body.2"] and net.head[0] is layers["head.0"]
