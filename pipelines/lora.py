"""Applying low-rank adapters to a pipeline: through diffusers' peft integration, or merged into the weights.

``apply_loras`` / ``remove_loras`` use diffusers' own loader (``load_lora_weights`` + ``set_adapters``), so what
the studio shows is what diffusers users get. ``merge_lora`` / ``unmerge_lora`` are our independent path (the peft
contract: merge adds strength·ΔW to the base weight, unmerge subtracts it); exports and tests rely on it.
"""
from __future__ import annotations

import torch

from .adapter_files import LoraAdapter, to_diffusers_state
from .errors import UserError


def apply_loras(pipe, adapters: list[tuple[LoraAdapter, float]]) -> list[str]:
    """Load each adapter under its own name and activate them with their strengths; returns the names."""
    names = []
    for i, (adapter, _) in enumerate(adapters):
        name = f"atelier_{i}"
        try:
            pipe.load_lora_weights(to_diffusers_state(adapter), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as exc:
            remove_loras(pipe)
            raise UserError(f"adapter {i + 1} does not fit this model ({str(exc).splitlines()[0][:160]})") from exc
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[float(w) for _, w in adapters])
    return names


def remove_loras(pipe) -> None:
    """Take every loaded adapter off again: the pipeline is the base model afterwards."""
    if getattr(pipe, "get_list_adapters", None) and any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()


def _target(pipe, name: str) -> torch.nn.Module:
    component, _, path = name.partition(".")
    module = getattr(pipe, component, None)
    if module is None:
        raise UserError(f"the model has no {component} for adapter layer {name}")
    candidates = [path, path.removeprefix("text_model.")] if component.startswith("text_encoder") else [path]
    for candidate in candidates:
        try:
            target = module.get_submodule(candidate)
            break
        except AttributeError:
            continue
    else:
        raise UserError(f"adapter layer {name} does not exist in this model")
    return getattr(target, "base_layer", target)


def _add(pipe, adapter: LoraAdapter, factor: float) -> None:
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            weight = _target(pipe, name).weight
            delta = layer.delta()
            if delta.shape != weight.shape:
                raise UserError(f"adapter layer {name} has shape {tuple(delta.shape)}, the model "
                                f"{tuple(weight.shape)}")
            weight.add_((factor * delta).to(device=weight.device, dtype=weight.dtype))


def merge_lora(pipe, adapter: LoraAdapter, strength: float = 1.0) -> None:
    _add(pipe, adapter, float(strength))


def unmerge_lora(pipe, adapter: LoraAdapter, strength: float = 1.0) -> None:
    _add(pipe, adapter, -float(strength))
