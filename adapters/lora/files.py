"""Low-rank adapter files: one in-memory form, two on-disk formats, metadata other tools understand.

In memory an adapter is a set of :class:`LoraLayer` (``down`` = A, ``up`` = B, ``alpha``; ΔW = B·A·alpha/rank)
keyed by the diffusers module path with its component prefix (``unet.down_blocks.0.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``). On disk:

- **diffusers** (peft) format: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``, what
  ``pipe.load_lora_weights`` reads. That loader (like ComfyUI's) takes alpha = rank unless told otherwise, so
  alpha/rank is folded into ``lora_B``; ``atelier.lora_alpha`` in the metadata lets an import recover the real alpha.
- **kohya** format: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, what kohya
  sd-scripts writes and A1111/ComfyUI read. The names use ``_`` for ``.``, so reading them is resolved against the
  model's real module names; without a model, diffusers' own renaming rules are used. SD 1.x/2.x files name the UNet
  as diffusers does (sd-scripts trains those on the diffusers UNet) and the text encoder ``lora_te_``; SDXL files name
  the text encoders ``lora_te1_``/``lora_te2_`` and the UNet in the original (sgm/LDM) numbering
  (``lora_unet_input_blocks_4_1_…`` = ``down_blocks.1.attentions.0``), because sd-scripts trains SDXL on that UNet
  and loads only names it knows; diffusers, A1111 and ComfyUI read that numbering too.

Imports also accept peft files with diffusers' ``lora_adapter_metadata`` (alpha, alpha_pattern, rsLoRA) and the old
diffusers layouts (``.lora.down``, ``processor.to_q_lora``, ``lora_linear_layer``).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file

from adapters.lora.config import FORMATS
from core.errors import UserError
from models.conditioning import SD2, SDXL, model_family
from core.safetensors_files import read_header, save_atomic
from models.single_file import unet_prefix_map

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")  # vae: the watermark LoRA on its decoder
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# transformers 5 dropped the ``text_model`` level of CLIPTextModel; files keep the conventional names.
TEXT_MODEL = "text_model."
TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")
# diffusers' key for the peft LoraConfig it stores in a file's metadata (``save_lora_weights(..., *_metadata)``).
DIFFUSERS_CONFIG_KEY = "lora_adapter_metadata"

_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[\w-]+)?\.weight")
_LEGACY_KEY = re.compile(r"(?P<stem>.+?)\.(?:(?P<proc>to_(?:q|k|v|out)_lora)|lora|lora_linear_layer)"
                         r"\.(?P<part>down|up)\.weight")
_KOHYA_KEY = re.compile(r"(?P<stem>lora_(?:unet|te|te1|te2)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)")
_PEFT_INTERNALS = re.compile(r"(^|\.)(base_layer|lora_A|lora_B|lora_dropout|lora_magnitude_vector|"
                             r"lora_embedding_A|lora_embedding_B)(\.|$)")
# SDXL base's UNet layout (diffusers' defaults for it): how an SDXL adapter's UNet layers are numbered in kohya's files
# when no model is at hand. Pass the model (``save_lora(..., pipe=)``) for any other layout.
SDXL_BASE_UNET = SimpleNamespace(layers_per_block=2, block_out_channels=(320, 640, 1280),
                                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
# SDXL's added-conditioning MLP, outside the block structure single_file's map covers.
_SGM_EXTRA = [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
_DIFFUSERS_BLOCK_STEMS = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")
_LEGACY_PROJ = {"unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
                "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                         "to_out_lora": "out_proj"}}


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

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the ΔW this layer produces (and of the weight it belongs to)."""
        return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        return delta(self, device)


def delta(layer: LoraLayer, device: torch.device | str | None = None) -> torch.Tensor:
    """ΔW = up·down·alpha/rank in the weight's shape, always in fp32 (fp16 products lose the small updates)."""
    up = layer.up.to(device=device, dtype=torch.float32)
    down = layer.down.to(device=device, dtype=torch.float32)
    return (up.flatten(1) @ down.flatten(1)).reshape(layer.weight_shape) * layer.scale


@dataclass
class LoraAdapter:
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {canonical_name(k): v for k, v in self.layers.items()}

    @property
    def rank(self) -> int:
        return max((layer.rank for layer in self.layers.values()), default=0)

    @property
    def components(self) -> set[str]:
        return {name.partition(".")[0] for name in self.layers}


def shapes_fit(delta_shape: Iterable[int], weight_shape: Iterable[int]) -> bool:
    """Equal shapes, or a Linear-shaped LoRA on a 1×1 conv (SD 1.x ``proj_in``) and the other way round."""
    a, b = tuple(delta_shape), tuple(weight_shape)
    return a == b or (len(a) >= 2 and len(b) >= 2 and _squeeze_kernel(a) == _squeeze_kernel(b))


def _squeeze_kernel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] + tuple(x for x in shape[2:] if x != 1)


def lora_targets(pipe) -> dict[str, torch.nn.Module]:
    """Every layer of ``pipe`` a LoRA can change: canonical name → the module holding the base weight.

    Layers currently wrapped by peft (adapters loaded through diffusers) map to their ``base_layer``.
    """
    targets: dict[str, torch.nn.Module] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        for name, module in model.named_modules():
            if not name or _PEFT_INTERNALS.search(name):
                continue
            base = getattr(module, "base_layer", module)
            if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                targets[canonical_name(f"{component}.{name}")] = base
    return targets


# ---------------------------------------------------------------------------------------------------- metadata


def lora_metadata(method: str, base_fingerprint: str, trigger_words: Iterable[str], rank: int, alpha: float,
                  settings: Mapping, base_model_name: str, title: str, *, sdxl: bool = False, v2: bool = False,
                  prediction_type: str = "epsilon", resolution: int | None = None) -> dict[str, str]:
    """Atelier's keys plus kohya's ``ss_*`` and ``modelspec.*``, so A1111/ComfyUI/Civitai show name and triggers and
    know the base (A1111 sorts LoRAs by ``ss_base_model_version`` / ``ss_v2``). The values are sd-scripts' own:
    ``sd_v1``, ``sd_v2_v`` (v-prediction), ``sdxl_base_v1-0``; modelspec prediction type ``epsilon`` or ``v``.
    ``prediction_type`` takes diffusers' spelling (``v_prediction``) too; :func:`base_model_facts` gives all four
    keywords for a loaded pipeline."""
    triggers = [t.strip() for t in trigger_words if t and t.strip()]
    v_param = prediction_type in ("v", "v_prediction")
    if sdxl:
        version, architecture = "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    else:
        version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_param else "")
        architecture = ("stable-diffusion-v2-768-v" if v_param else "stable-diffusion-v2-512") if v2 \
            else "stable-diffusion-v1"
    meta = {
        "atelier.method": method,
        "atelier.base_fingerprint": base_fingerprint,
        "atelier.trigger_words": ", ".join(triggers),
        "atelier.settings": json.dumps(dict(settings), default=str, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": f"{float(alpha):g}",
        "ss_base_model_version": version,
        "ss_v2": str(bool(v2)),
        "ss_sd_model_name": base_model_name,
        "ss_output_name": title,
        # kohya's shape: {dataset folder: {tag: count}}; the webui's tag list reads it.
        "ss_tag_frequency": json.dumps({title or "atelier": {t: 1 for t in triggers}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": title,
        "modelspec.trigger_phrase": ", ".join(triggers),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
    }
    if resolution:
        meta["modelspec.resolution"] = f"{int(resolution)}x{int(resolution)}"
        meta["ss_resolution"] = f"({int(resolution)}, {int(resolution)})"
    return meta


def base_model_facts(pipe, resolution: int | None = None) -> dict[str, Any]:
    """:func:`lora_metadata`'s keywords for an adapter trained on ``pipe`` (family, prediction type, resolution;
    ``resolution`` defaults to the model's native size)."""
    family = model_family(pipe)
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    return {"sdxl": family is SDXL, "v2": family is SD2,
            "prediction_type": str(pipe.scheduler.config.get("prediction_type", "epsilon")),
            "resolution": int(resolution or native)}


def _string_metadata(metadata: Mapping) -> dict[str, str]:
    """safetensors accepts only str → str; numbers and structures are written as text rather than failing a save."""
    return {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in metadata.items()}


# ---------------------------------------------------------------------------------------------------- writing


def to_diffusers_state(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The diffusers/peft state dict, alpha/rank folded into ``lora_B`` (fp32 maths, stored in the layer's dtype)."""
    state = {}
    for name, layer in adapter.layers.items():
        state[f"{name}.lora_A.weight"] = layer.down
        state[f"{name}.lora_B.weight"] = (layer.up.float() * layer.scale).to(layer.up.dtype)
    return state


def is_sdxl_unet(unet_config) -> bool:
    """SDXL's UNet (and only it among the families) takes the pooled embedding and time ids."""
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


def sgm_unet_names(unet_config=None) -> list[tuple[str, str]]:
    """(diffusers prefix, sgm prefix) for a UNet's layers: single_file's checkpoint map plus SDXL's added-conditioning
    MLP. Without a config, SDXL base's layout."""
    return unet_prefix_map(unet_config if unet_config is not None else SDXL_BASE_UNET) + _SGM_EXTRA


def _swap_prefix(path: str, pairs: Iterable[tuple[str, str]], sep: str = ".") -> str | None:
    """``path`` with its longest matching prefix (whole ``sep``-separated segments) replaced; None when none does."""
    matches = [(src, dst) for src, dst in pairs if path == src or path.startswith(src + sep)]
    if not matches:
        return None
    src, dst = max(matches, key=lambda pair: len(pair[0]))
    return dst + path[len(src):]


def kohya_stem(name: str, sdxl: bool = False, sgm: list[tuple[str, str]] | None = None) -> str:
    """kohya's module name for layer ``name``; ``sgm`` (from :func:`sgm_unet_names`) renumbers an SDXL UNet."""
    component, _, module = canonical_name(name).partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
              "text_encoder_2": "lora_te2_"}.get(component)
    if prefix is None:
        raise UserError(f"cannot write {name} in kohya format (unknown component {component!r})")
    if component == "unet" and sgm is not None:
        renamed = _swap_prefix(module, sgm)
        if renamed is None:
            raise UserError(f"cannot write {name} in kohya's SDXL layout (no such layer in the original UNet)")
        module = renamed
    return prefix + module.replace(".", "_")


def is_sdxl_adapter(adapter: LoraAdapter) -> bool:
    """Trained on SDXL, as far as the adapter itself tells: a second text encoder's layers, or its metadata."""
    return "text_encoder_2" in adapter.components or \
        adapter.metadata.get("ss_base_model_version", "").startswith("sdxl")


def to_kohya_state(adapter: LoraAdapter, unet_config=None) -> dict[str, torch.Tensor]:
    """kohya's state dict: ``lora_down``/``lora_up`` and a real 0-dim ``alpha`` per module.

    All modules get the adapter's most common alpha, layers with another alpha having it folded into ``lora_up``
    (same ΔW): diffusers' kohya import honours a single alpha only and mis-scales the attention and text-encoder
    layers whose alpha differs from it. SDXL (``unet_config`` of an SDXL UNet, or an SDXL adapter without one) gets
    sd-scripts' SDXL names: ``lora_te1_``/``lora_te2_`` and the UNet in sgm numbering of that layout (SDXL base's
    without a config).
    """
    sdxl = is_sdxl_unet(unet_config) if unet_config is not None else is_sdxl_adapter(adapter)
    sgm = sgm_unet_names(unet_config) if sdxl else None
    common = Counter(float(layer.alpha) for layer in adapter.layers.values()).most_common(1)[0][0]
    state = {}
    for name, layer in adapter.layers.items():
        stem = kohya_stem(name, sdxl, sgm)
        up = layer.up
        if float(layer.alpha) != common:
            up = (up.float() * (float(layer.alpha) / common)).to(up.dtype)
        state[f"{stem}.lora_down.weight"] = layer.down
        state[f"{stem}.lora_up.weight"] = up
        state[f"{stem}.alpha"] = torch.tensor(common, dtype=torch.float32)
    return state


def save_lora(adapter: LoraAdapter, path: Path, format: str = "diffusers", *, pipe=None) -> Path:
    """Write ``adapter`` as ``.safetensors`` in ``format`` ("diffusers" or "kohya"), atomically (temp + rename).

    ``pipe``, the model the adapter belongs to, gives kohya's SDXL UNet names their model's block layout.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: adapter files are .safetensors")
    if not adapter.layers:
        raise UserError(f"{path.name}: the adapter has no layers to save")
    metadata = {**_string_metadata(adapter.metadata), "atelier.format": format}
    # Both describe the layout of the file the adapter was read from; diffusers would scale our folded B by the
    # old config's alpha once more.
    metadata.pop(DIFFUSERS_CONFIG_KEY, None)
    metadata.pop("atelier.lora_alpha", None)
    if format == "diffusers":
        state = to_diffusers_state(adapter)
        alphas = {float(layer.alpha) for layer in adapter.layers.values()}
        if len(alphas) == 1:
            metadata["atelier.lora_alpha"] = repr(alphas.pop())
    elif format == "kohya":
        state = to_kohya_state(adapter, pipe.unet.config if pipe is not None else None)
    else:
        raise UserError(f"unknown adapter format {format!r} (diffusers or kohya)")
    save_atomic(state, path, metadata)
    return path


# ---------------------------------------------------------------------------------------------------- reading


def detect_format(keys: Iterable[str]) -> str:
    """"diffusers" (peft lora_A/B), "kohya", "diffusers-legacy", or what we refuse: "lycoris", "dora", "unknown"."""
    keys = [k for k in keys if k != "__metadata__"]
    if any(part in k for k in keys for part in (".hada_w", ".lokr_w", ".lokr_t")):
        return "lycoris"
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys):
        return "dora"
    if any(_KOHYA_KEY.fullmatch(k) and not k.endswith(".alpha") for k in keys):
        return "kohya"
    if any(_PEFT_KEY.fullmatch(k) for k in keys):
        return "diffusers"
    if any(_LEGACY_KEY.fullmatch(k) for k in keys):
        return "diffusers-legacy"
    return "unknown"


@dataclass
class _Pairs:
    """down/up/alpha tensors collected per layer while a file is read."""

    down: dict[str, torch.Tensor] = field(default_factory=dict)
    up: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)

    def layers(self, filename: str) -> dict[str, LoraLayer]:
        halves = sorted(set(self.down) ^ set(self.up))
        if halves:
            raise UserError(f"{filename}: incomplete LoRA layers (down or up missing) for {few_names(halves)}")
        layers = {}
        for name, down in self.down.items():
            up = self.up[name]
            if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] \
                    or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
                raise UserError(f"{filename}: layer {name} has shapes that do not pair "
                                f"(down {tuple(down.shape)}, up {tuple(up.shape)})")
            layers[name] = LoraLayer(down=down, up=up, alpha=self.alpha.get(name, float(down.shape[0])))
        return layers


def few_names(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _component_and_path(module: str) -> tuple[str, str]:
    """Split ``unet.x`` / ``text_encoder.x``; bare paths (peft saving a lone UNet) belong to the UNet."""
    module = module.removeprefix("base_model.model.")
    head, _, rest = module.partition(".")
    return (head, rest) if head in COMPONENTS and rest else ("unet", module)


def _legacy_module(stem: str, proc: str | None) -> str:
    """Old diffusers names (``attn1.processor.to_q_lora``, ``to_q.lora``, ``q_proj.lora_linear_layer``) → module."""
    component, path = _component_and_path(stem)
    path = re.sub(r"(^|\.)processor(\.|$)", r"\1", path).strip(".")
    if proc:
        table = _LEGACY_PROJ["text" if component.startswith("text_encoder") else "unet"]
        path = f"{path}.{table[proc]}" if path else table[proc]
    return canonical_name(f"{component}.{path}")


def _pattern_value(patterns: Mapping[str, object], path: str, default):
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module path it ends (by whole segments)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _diffusers_config_alpha(config: Mapping[str, object], name: str, rank: int) -> float | None:
    """The alpha diffusers' ``lora_adapter_metadata`` (a peft LoraConfig per component) gives layer ``name``."""
    component, _, path = name.partition(".")
    cfg = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(f"{component}.")}
    if not cfg:
        return None
    alpha = float(cfg.get("lora_alpha", 8))  # peft's LoraConfig default
    patterns = cfg.get("alpha_pattern") or {}
    for candidate in (path, path.removeprefix(TEXT_MODEL)):
        alpha = float(_pattern_value(patterns, candidate, alpha))
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha/√r; ours is alpha/r
    return alpha


def _read_diffusers(state: dict[str, torch.Tensor], metadata: dict[str, str], filename: str) -> _Pairs:
    pairs = _Pairs()
    per_module_alpha = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.fullmatch(key)
        if match:
            component, path = _component_and_path(match["module"])
            name = canonical_name(f"{component}.{path}")
            (pairs.down if match["part"] == "lora_A" else pairs.up)[name] = tensor
        elif key.endswith(".alpha") and tensor.numel() == 1:
            component, path = _component_and_path(key.removesuffix(".alpha"))
            per_module_alpha[canonical_name(f"{component}.{path}")] = float(tensor.item())
        else:
            pairs.unmapped.append(key)
    config = {}
    if metadata.get(DIFFUSERS_CONFIG_KEY):
        try:
            config = json.loads(metadata[DIFFUSERS_CONFIG_KEY])
        except ValueError as exc:
            raise UserError(f"{filename}: its {DIFFUSERS_CONFIG_KEY} metadata is not JSON") from exc
    real = _float_or_none(metadata.get("atelier.lora_alpha")) if metadata.get("atelier.format") == "diffusers" \
        else None
    for name, down in pairs.down.items():
        rank = int(down.shape[0])
        alpha = per_module_alpha.get(name)
        if alpha is None and isinstance(config, dict):
            try:
                alpha = _diffusers_config_alpha(config, name, rank)
            except (TypeError, ValueError, re.error) as exc:
                raise UserError(f"{filename}: its {DIFFUSERS_CONFIG_KEY} metadata is malformed ({exc})") from exc
        if alpha is not None:
            pairs.alpha[name] = alpha
        elif real and real > 0 and name in pairs.up:
            # our own file: alpha/rank was folded into lora_B; unfold it so a kohya export carries the real alpha
            pairs.up[name] = (pairs.up[name].float() * (rank / real)).to(pairs.up[name].dtype)
            pairs.alpha[name] = real
    return pairs


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _read_legacy(state: dict[str, torch.Tensor]) -> _Pairs:
    pairs = _Pairs()
    for key, tensor in state.items():
        match = _LEGACY_KEY.fullmatch(key)
        if match:
            name = _legacy_module(match["stem"], match["proc"])
            (pairs.down if match["part"] == "down" else pairs.up)[name] = tensor
        else:
            pairs.unmapped.append(key)
    return pairs


def _kohya_names_by_diffusers(stems: list[str], unet_config=None) -> dict[str, str]:
    """diffusers' own kohya renaming rules (incl. SDXL's sgm block numbering), for names no model resolved.

    diffusers only converts whole state dicts, so each stem goes in as a tiny tensor carrying its own index; the
    index that comes out under a diffusers name says which stem that name belongs to.
    """
    from diffusers import StableDiffusionPipeline  # ~1 s to import: only kohya names need it, not reading a file

    probe = {}
    for i, stem in enumerate(stems):
        probe[f"{stem}.lora_down.weight"] = torch.tensor([float(i)])
        probe[f"{stem}.lora_up.weight"] = torch.tensor([float(i)])
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(probe, unet_config=unet_config)
    except Exception:  # names diffusers cannot place either: reported by the caller
        return {}
    names = {}
    for key, marker in converted.items():
        match = _LEGACY_KEY.fullmatch(key)
        if match and match["part"] == "down":
            names[stems[int(marker.item())]] = _legacy_module(match["stem"], match["proc"])
    return names


def _sgm_aliases(stems: Iterable[str], pipe, metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya stems in sgm numbering (SDXL files, ComfyUI exports) → the same stem in diffusers numbering, by the
    model's block layout (SDXL base's for an SDXL file read without a model; none for other files without one)."""
    if pipe is not None:
        config = pipe.unet.config
    elif any(s.startswith("lora_te2_") for s in stems) or metadata.get("ss_base_model_version", "").startswith("sdxl"):
        config = None
    else:
        return {}
    try:
        pairs = [(sgm.replace(".", "_"), diffusers.replace(".", "_")) for diffusers, sgm in sgm_unet_names(config)]
    except (AttributeError, TypeError):  # a UNet config single_file's map does not cover (per-block layer counts)
        return {}
    aliases = {}
    for stem in stems:
        if stem.startswith("lora_unet_"):
            renamed = _swap_prefix(stem.removeprefix("lora_unet_"), pairs, "_")
            if renamed is not None:
                aliases[stem] = "lora_unet_" + renamed
    return aliases


def _read_kohya(state: dict[str, torch.Tensor], pipe, metadata: Mapping[str, str]) -> _Pairs:
    by_stem: dict[str, dict[str, torch.Tensor]] = {}
    pairs = _Pairs()
    for key, tensor in state.items():
        match = _KOHYA_KEY.fullmatch(key)
        if match:
            by_stem.setdefault(match["stem"], {})[match["part"]] = tensor
        else:
            pairs.unmapped.append(key)
    names: dict[str, str] = {}
    aliases = _sgm_aliases(by_stem, pipe, metadata)  # looked up as their diffusers-numbered stem
    targets = lora_targets(pipe) if pipe is not None else None
    if targets is not None:
        index = {}
        for name in targets:
            component, _, path = name.partition(".")
            for prefix, owner in KOHYA_PREFIXES.items():
                if owner == component:
                    index[prefix + path.replace(".", "_")] = name
        names = {stem: index[aliases.get(stem, stem)] for stem in by_stem if aliases.get(stem, stem) in index}
    rest = [stem for stem in by_stem if stem not in names]
    if rest:
        unet_config = getattr(getattr(pipe, "unet", None), "config", None)
        # diffusers maps sgm block numbers only with the model's config, the layers outside the blocks always
        probe = {aliases[s] if aliases.get(s, "").startswith(_DIFFUSERS_BLOCK_STEMS) else s: s for s in rest}
        guessed = _kohya_names_by_diffusers(list(probe), unet_config)
        names.update({probe[s]: n for s, n in guessed.items() if targets is None or n in targets})
    for stem, parts in by_stem.items():
        name = names.get(stem)
        if name is None:
            pairs.unmapped.append(stem)
            continue
        if "lora_down.weight" in parts:
            pairs.down[name] = parts["lora_down.weight"]
        if "lora_up.weight" in parts:
            pairs.up[name] = parts["lora_up.weight"]
        if "alpha" in parts:
            pairs.alpha[name] = float(parts["alpha"].float().item())
    return pairs


def _fit_to_model(layers: dict[str, LoraLayer], pipe, filename: str) -> dict[str, LoraLayer]:
    """Refuse, by name, layers the model lacks or whose shapes differ (an adapter for another architecture); give a
    Linear-shaped LoRA on a 1×1 conv (or the reverse: SD 2.x vs SD 1.x ``proj_in``) the model's layout."""
    targets = lora_targets(pipe)
    missing = sorted(name for name in layers if name not in targets)
    if missing:
        raise UserError(f"{filename}: {len(missing)} layer(s) do not exist in this model ({few_names(missing)}); "
                        "is it a LoRA for another architecture?")
    wrong = [f"{name} {layer.weight_shape} vs {tuple(targets[name].weight.shape)}"
             for name, layer in layers.items() if not shapes_fit(layer.weight_shape, targets[name].weight.shape)]
    if wrong:
        raise UserError(f"{filename}: {len(wrong)} layer(s) have other shapes than this model's "
                        f"({few_names(wrong, 2)}); is it a LoRA for another base model size (SD 1.x / 2.x / XL)?")
    fitted = {}
    for name, layer in layers.items():
        conv = targets[name].weight.dim() == 4
        if conv and layer.down.dim() == 2:
            layer = LoraLayer(layer.down[:, :, None, None], layer.up[:, :, None, None], layer.alpha)
        elif not conv and layer.down.dim() == 4:
            layer = LoraLayer(layer.down.flatten(1), layer.up.flatten(1), layer.alpha)
        fitted[name] = layer
    return fitted


def load_lora(path: Path, pipe=None) -> LoraAdapter:
    """Read a diffusers/peft, old-diffusers or kohya LoRA file; every problem is a one-line ``UserError``.

    With ``pipe`` the layer names are resolved against (and checked with) that model; kohya's ambiguous names are
    exact only then.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: only .safetensors adapter files are loaded (pickles can run code)")
    header = read_header(path)  # refuses empty, truncated, renamed-pickle files before safetensors sees them
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    kind = detect_format(header)
    if kind == "lycoris":
        raise UserError(f"{path.name}: a LyCORIS (LoHa/LoKr) adapter; only plain LoRA files are supported")
    if kind == "dora":
        raise UserError(f"{path.name}: a DoRA adapter; its magnitude vectors cannot be applied as a plain LoRA")
    if kind == "unknown":
        raise UserError(f"{path.name}: not a LoRA file (no lora_A/lora_B or lora_down/lora_up weights)")
    try:
        state = load_file(str(path))
    except Exception as exc:  # header was fine, yet a tensor is not (unknown dtype, bad offsets)
        raise UserError(f"{path.name}: the .safetensors file cannot be read ({str(exc).splitlines()[0][:120]})") \
            from exc
    if kind == "kohya":
        pairs = _read_kohya(state, pipe, metadata)
    elif kind == "diffusers":
        pairs = _read_diffusers(state, metadata, path.name)
    else:
        pairs = _read_legacy(state)
    if pairs.unmapped:
        where = "this model" if pipe is not None else "a diffusers layer"
        raise UserError(f"{path.name}: {len(pairs.unmapped)} key(s) cannot be mapped to {where} "
                        f"({few_names(sorted(pairs.unmapped))})")
    layers = pairs.layers(path.name)
    if not layers:
        raise UserError(f"{path.name}: the file holds no LoRA layers")
    if pipe is not None:
        layers = _fit_to_model(layers, pipe, path.name)
    return LoraAdapter(layers=layers, metadata={**metadata, "atelier.format": kind})


def export_lora(src: Path, dst: Path, format: str, pipe=None) -> Path:
    """Convert ``src`` to ``format`` at ``dst`` with the same ΔW and metadata (``pipe`` resolves kohya names and
    gives SDXL's kohya names their block layout)."""
    return save_lora(load_lora(src, pipe), dst, format=format, pipe=pipe)


def check_base(adapter: LoraAdapter, fingerprint: str, *, strict: bool = False) -> str | None:
    """A loud warning (or, strict, an error) when the adapter was trained on another base model; None otherwise."""
    base = adapter.metadata.get("atelier.base_fingerprint")
    if not base or base == fingerprint:
        return None
    title = adapter.metadata.get("modelspec.title") or adapter.metadata.get("ss_output_name") or "this adapter"
    message = (f"WARNING: {title} was trained on another base model (fingerprint {base}, loaded model "
               f"{fingerprint}); its effect here may be garbage")
    if strict:
        raise UserError(message.removeprefix("WARNING: "))
    return message
