"""Low-rank adapter files: one in-memory form, two on-disk formats, metadata other tools understand.

In memory an adapter is a set of :class:`LoraLayer` (``down`` = A, ``up`` = B, ``alpha``; ΔW = B·A·alpha/rank)
keyed by the diffusers module path with its component prefix (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``). On disk:

- **diffusers** (peft) format — ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight``; what
  ``pipe.load_lora_weights`` reads. Its loader assumes alpha = rank, so alpha/rank is folded into ``lora_B``.
- **kohya** format — ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``; what
  kohya sd-scripts writes and A1111/ComfyUI read. Names use ``_`` for ``.``, so reading them needs the model's
  module names to undo the ambiguity.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .safetensors_files import read_header

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# transformers 5 dropped the ``text_model`` level of CLIPTextModel; files keep the conventional names.
TEXT_MODEL = "text_model."
TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")


def canonical_name(name: str) -> str:
    """The portable layer name: text-encoder paths always carry ``text_model.``, whatever transformers is installed."""
    component, _, path = name.partition(".")
    if component.startswith("text_encoder") and path.startswith(TEXT_MODEL_CHILDREN):
        return f"{component}.{TEXT_MODEL}{path}"
    return name


@dataclass
class LoraLayer:
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW in the shape of the layer's weight, computed in fp32."""
        up, down = self.up.float(), self.down.float()
        scale = self.alpha / self.rank
        if down.dim() == 4:
            return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale
        return (up @ down) * scale


@dataclass
class LoraAdapter:
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {canonical_name(k): v for k, v in self.layers.items()}

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)


def lora_metadata(*, method: str, base_fingerprint: str, trigger_words: list[str], rank: int, alpha: float,
                  settings: dict, base_model_name: str, title: str) -> dict[str, str]:
    """Atelier's keys plus kohya's ``ss_*`` and ``modelspec.*``, so A1111/ComfyUI show name and triggers."""
    triggers = [t for t in trigger_words if t]
    return {
        "atelier.method": method,
        "atelier.base_fingerprint": base_fingerprint,
        "atelier.trigger_words": ", ".join(triggers),
        "atelier.settings": json.dumps(settings, default=str),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": base_model_name,
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps({"triggers": {t: 1 for t in triggers}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.trigger_phrase": ", ".join(triggers),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_diffusers_state(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in adapter.layers.items():
        state[f"{name}.lora_A.weight"] = layer.down.float()
        state[f"{name}.lora_B.weight"] = layer.up.float() * (layer.alpha / layer.rank)
    return state


def to_kohya_state(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in adapter.layers.items():
        component, _, module = name.partition(".")
        if component not in PREFIXES:
            raise UserError(f"cannot write {name} in kohya format (unknown component {component!r})")
        key = PREFIXES[component] + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = layer.down.float()
        state[f"{key}.lora_up.weight"] = layer.up.float()
        state[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return state


def save_lora(adapter: LoraAdapter, path: Path, format: str = "diffusers") -> Path:
    """Write ``adapter`` as ``.safetensors`` in ``format`` ("diffusers" or "kohya"), atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path.name}: adapter files are .safetensors")
    if format == "diffusers":
        state = to_diffusers_state(adapter)
    elif format == "kohya":
        state = to_kohya_state(adapter)
    else:
        raise UserError(f"unknown adapter format {format!r} (diffusers or kohya)")
    _atomic_save(state, path, {**adapter.metadata, "atelier.format": format})
    return path


def detect_format(keys: list[str]) -> str:
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    if any(k.startswith(tuple(PREFIXES.values())) and ".lora_down." in k for k in keys):
        return "kohya"
    if any(".lora.down." in k or "_lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return "diffusers-legacy"
    return "unknown"


def _module_index(pipe) -> dict[str, str]:
    """kohya-style flattened name → dotted module path, for every component that can carry a LoRA."""
    index = {}
    for component, prefix in PREFIXES.items():
        module = getattr(pipe, component, None) if pipe is not None else None
        if module is None:
            continue
        for name, _ in module.named_modules():
            if name:
                full = canonical_name(f"{component}.{name}")
                index[prefix + full.partition(".")[2].replace(".", "_")] = full
    return index


def _from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, LoraLayer]:
    layers = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            up = state.get(f"{name}.lora_B.weight")
            if up is None:
                raise UserError(f"adapter file is incomplete: {name}.lora_B.weight is missing")
            layers[canonical_name(name)] = LoraLayer(down=down, up=up, alpha=float(down.shape[0]))
    return layers


def _from_kohya(state: dict[str, torch.Tensor], pipe, filename: str) -> dict[str, LoraLayer]:
    if pipe is None:
        raise UserError(f"{filename}: a kohya-format file needs the base model to resolve its layer names")
    index = _module_index(pipe)
    layers, unknown = {}, []
    for key, down in state.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        up = state.get(f"{stem}.lora_up.weight")
        if up is None:
            raise UserError(f"{filename}: {stem}.lora_up.weight is missing")
        alpha = state.get(f"{stem}.alpha")
        name = index.get(stem)
        if name is None:
            unknown.append(stem)
            continue
        layers[name] = LoraLayer(down=down, up=up,
                                 alpha=float(alpha.item()) if alpha is not None else float(down.shape[0]))
    if unknown:
        raise UserError(f"{filename}: {len(unknown)} layer(s) do not exist in this model "
                        f"(e.g. {', '.join(unknown[:3])}); is it a LoRA for another architecture?")
    return layers


def _unfold_alpha(layers: dict[str, LoraLayer], alpha: float) -> None:
    """Our diffusers files fold alpha/rank into ``up``; undo it so a kohya export carries the real alpha."""
    if alpha <= 0:
        return
    for layer in layers.values():
        layer.up = layer.up * (layer.rank / alpha)
        layer.alpha = alpha


def load_lora(path: Path, pipe=None) -> LoraAdapter:
    """Read a diffusers/peft or kohya LoRA file; every problem is a one-line ``UserError``."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: only .safetensors adapter files are loaded")
    header = read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    keys = [k for k in header if k != "__metadata__"]
    kind = detect_format(keys)
    if kind == "unknown":
        raise UserError(f"{path.name}: not a LoRA file (no lora_A/lora_B or lora_down/lora_up weights)")
    if kind == "diffusers-legacy":
        raise UserError(f"{path.name}: old diffusers LoRA layout; re-save it with a current diffusers "
                        "(pipe.save_lora_weights) and import that")
    state = load_file(str(path))
    layers = _from_diffusers(state) if kind == "diffusers" else _from_kohya(state, pipe, path.name)
    if kind == "diffusers" and metadata.get("atelier.format") == "diffusers" and metadata.get("ss_network_alpha"):
        _unfold_alpha(layers, float(metadata["ss_network_alpha"]))
    if not layers:
        raise UserError(f"{path.name}: the file holds no LoRA layers")
    return LoraAdapter(layers=layers, metadata={**metadata, "atelier.format": kind})


def export_lora(src: Path, dst: Path, format: str, pipe=None) -> Path:
    adapter = load_lora(src, pipe)
    return save_lora(adapter, dst, format=format)


def check_base(adapter: LoraAdapter, fingerprint: str, *, strict: bool = False) -> str | None:
    """A loud warning (or, strict, an error) when the adapter was trained on another base model."""
    base = adapter.metadata.get("atelier.base_fingerprint")
    if not base or base == fingerprint:
        return None
    message = (f"this adapter was trained on another base model (fingerprint {base}, this model {fingerprint}); "
               "results may be garbage")
    if strict:
        raise UserError(message)
    return message
