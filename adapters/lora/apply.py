"""Applying low-rank adapters to a pipeline: through diffusers' peft integration, or merged into the weights.

``apply_loras`` / ``remove_loras`` use diffusers' own loader (``load_lora_weights`` + ``set_adapters``), so what the
studio shows is what diffusers users get, several adapters at once with their strengths, and taking them off leaves
the untouched base modules. ``merge_lora`` / ``unmerge_lora`` are our independent path (the peft merge contract:
merge adds strength·ΔW to the base weight, unmerge subtracts it again); exports, extraction and the tests rely on it.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from adapters.lora.files import LoraAdapter, delta, few_names, lora_targets, shapes_fit, to_diffusers_state
from core.errors import UserError


def loaded_adapter_names(pipe) -> set[str]:
    """Names of the adapters diffusers has loaded into any component of ``pipe``."""
    get = getattr(pipe, "get_list_adapters", None)
    return {name for names in (get() if get else {}).values() for name in names}


@contextmanager
def _quiet_loaders() -> Iterator[None]:
    """Hush two false alarms while adapters load: diffusers' "no LoRA keys for the text encoder" for UNet-only
    adapters, and transformers' report listing the *other* adapters' keys as missing from each new one."""
    from transformers.utils import logging as hf_logging  # heavy; loaded already once adapters load

    loggers = [logging.getLogger(name) for name in ("diffusers.loaders.lora_base", "transformers.integrations.peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per adapter and text encoder
    try:
        with warnings.catch_warnings():
            # peft warns whenever a second adapter joins a model: several adapters is the point here.
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _component_state(pipe, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The diffusers state dict, each tensor already on its component's device (no host round trip per layer)."""
    state = {}
    for key, tensor in to_diffusers_state(adapter).items():
        module = getattr(pipe, key.partition(".")[0], None)
        device = getattr(module, "device", None)
        state[key] = tensor.to(device) if device is not None else tensor
    return state


def apply_loras(pipe, adapters: Sequence[tuple[LoraAdapter, float]], *,
                names: Sequence[str] | None = None) -> list[str]:
    """Load each adapter under its own name and make exactly these active with their strengths; returns the names.

    Adapters already loaded under one of ``names`` are replaced; others stay loaded but inactive.
    """
    names = [f"atelier_{i}" for i in range(len(adapters))] if names is None else [str(n) for n in names]
    if len(names) != len(adapters) or len(set(names)) != len(names):
        raise ValueError("apply_loras needs one distinct name per adapter")
    if not adapters:
        return []
    stale = [n for n in names if n in loaded_adapter_names(pipe)]
    if stale:
        pipe.delete_adapters(stale)
    with _quiet_loaders():
        try:
            for i, (name, (adapter, _)) in enumerate(zip(names, adapters), start=1):
                try:
                    pipe.load_lora_weights(_component_state(pipe, adapter), adapter_name=name)
                except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                    raise UserError(f"adapter {i} ({name}) does not fit this model "
                                    f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]})") from exc
            pipe.set_adapters(names, adapter_weights=[float(strength) for _, strength in adapters])
        except BaseException:
            partial = [n for n in names if n in loaded_adapter_names(pipe)]
            if partial:
                pipe.delete_adapters(partial)
            raise
    return names


def remove_loras(pipe) -> None:
    """Take every loaded adapter off again: the peft wrappers go, the untouched base modules come back."""
    if loaded_adapter_names(pipe):
        pipe.unload_lora_weights()


def _plan(pipe, adapter: LoraAdapter) -> list[tuple[torch.nn.Parameter, object]]:
    """Every (weight, layer) pair, checked before any weight changes, so a bad adapter never half-merges."""
    targets = lora_targets(pipe)
    missing = sorted(name for name in adapter.layers if name not in targets)
    if missing:
        raise UserError(f"{len(missing)} adapter layer(s) do not exist in this model ({few_names(missing)})")
    plan = []
    for name, layer in adapter.layers.items():
        weight = targets[name].weight
        if not shapes_fit(layer.weight_shape, weight.shape):
            raise UserError(f"adapter layer {name} has shape {layer.weight_shape}, the model {tuple(weight.shape)}")
        plan.append((weight, layer))
    return plan


def _add_delta(pipe, adapter: LoraAdapter, factor: float) -> None:
    plan = _plan(pipe, adapter)
    with torch.no_grad():
        for weight, layer in plan:
            # Sum in fp32 and round once: an fp16/bf16 weight plus an fp16 ΔW would round twice.
            update = delta(layer, weight.device).reshape(weight.shape)
            weight.copy_((weight.float() + factor * update).to(weight.dtype))


def merge_lora(pipe, adapter: LoraAdapter, strength: float = 1.0) -> None:
    """Add strength·ΔW of every layer into the base weights (any device or dtype)."""
    _add_delta(pipe, adapter, float(strength))


def unmerge_lora(pipe, adapter: LoraAdapter, strength: float = 1.0) -> None:
    """Subtract what ``merge_lora`` added; the weights come back within floating-point tolerance."""
    _add_delta(pipe, adapter, -float(strength))
