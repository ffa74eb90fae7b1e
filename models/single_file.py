"""Single-file Stable Diffusion checkpoints (the A1111/ComfyUI ``.safetensors`` layout): load offline, and export.

Loading goes through diffusers' ``from_single_file``. For SD 1.x the component configs and the CLIP tokenizer ship in
``assets/sd15_config``, so nothing is fetched from the Hub. Export writes the original LDM key layout
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``) from a diffusers pipeline,
generically over the UNet's block layout, so merged models can be taken to other tools.

Before anything loads, the header alone (names and shapes) tells what the file is, by this module's own key test and
by diffusers' single-file detection; an SD3, Flux, refiner or inpainting checkpoint is refused there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from models.devices import dtype_kwargs
from core.errors import ModelLoadError
from models.architecture import Architecture, check_architecture, read_folder_configs
from core.paths import ASSETS
from core.safetensors_files import read_header, save_atomic

SD15_CONFIG = ASSETS / "sd15_config"


def detect_architecture(keys: Iterable[str]) -> str:
    """"sd1" | "sd2" | "sdxl" | "sdxl-refiner" | "unknown", from the state dict's key names alone."""
    keys = set(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if not has("model.diffusion_model.input_blocks."):
        return "unknown"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return "unknown"


# diffusers' single-file model types the studio cannot use → the pipeline class they are (by prefix, longest first)
SINGLE_FILE_PIPELINES = {
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline", "xl_inpaint": "StableDiffusionXLInpaintPipeline",
    "inpainting": "StableDiffusionInpaintPipeline", "upscale": "StableDiffusionUpscalePipeline",
    "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline", "sd3": "StableDiffusion3Pipeline",
    "sd35": "StableDiffusion3Pipeline", "flux-fill": "FluxFillPipeline", "flux-2": "Flux2Pipeline",
    "flux": "FluxPipeline", "stable_cascade": "StableCascadeCombinedPipeline", "sana": "SanaPipeline",
    "auraflow": "AuraFlowPipeline", "lumina2": "Lumina2Pipeline",
}
TEXT_TO_IMAGE_TYPES = ("v1", "v2", "xl_base")
FAMILY_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline"}
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


class _Shape:
    """A header entry standing in for a tensor: diffusers' detection reads only names and ``.shape``."""

    def __init__(self, shape) -> None:
        self.shape = torch.Size(shape)


def diffusers_model_type(header: dict) -> str:
    """diffusers' own name for a checkpoint ("v1", "xl_base", "xl_refiner", "inpainting", "sd3", "flux-dev", …),
    from the header's names and shapes; no tensor is read. "unknown" where its test needs values or other keys."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type  # heavy: only when a header is read

    shapes = {k: _Shape(v.get("shape", ())) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    try:
        return str(infer_diffusers_model_type(shapes))
    except Exception:  # a branch that reads tensor values, or expects keys this file lacks
        return "unknown"


def single_file_architecture(header: dict) -> tuple[Architecture, str]:
    """(what the file is, this module's family: "sd1" | "sd2" | "sdxl" | …), from the header alone. The family
    comes from key prefixes (right for any size, tiny test models too); diffusers' type names what is refused."""
    family = detect_architecture(k for k in header if k != "__metadata__")
    kind = diffusers_model_type(header)
    conv = header.get(FIRST_CONV)
    shape = conv.get("shape") if isinstance(conv, dict) else None
    channels = int(shape[1]) if isinstance(shape, list) and len(shape) == 4 else None
    if family == "sdxl-refiner" or kind == "xl_refiner":
        return Architecture("StableDiffusionXLImg2ImgPipeline", channels, refiner=True), family
    if kind not in TEXT_TO_IMAGE_TYPES:
        prefix = max((p for p in SINGLE_FILE_PIPELINES if kind.startswith(p)), key=len, default=None)
        if prefix is not None:
            return Architecture(SINGLE_FILE_PIPELINES[prefix], channels), family
        if kind != "unknown":  # a kind diffusers knows (a ControlNet, a video model, Playground's EDM SDXL …)
            return Architecture(None, channels, label=f"a {kind!r} checkpoint (as diffusers reads it)"), family
    if family in FAMILY_PIPELINES:
        return Architecture(FAMILY_PIPELINES[family], channels), family
    return Architecture(None, channels, label="an unknown architecture (not a Stable Diffusion checkpoint)"), family


def check_single_file(path: Path) -> str:
    """The family ("sd1" | "sd2" | "sdxl") of a whole ``.safetensors`` checkpoint the studio can use, or a one-line
    refusal naming what it is; reads only the header."""
    path = Path(path)
    architecture, family = single_file_architecture(read_header(path))
    check_architecture(architecture, path.name)
    return family


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def config_for(architecture: str, config: Path | None, name: str) -> Path | None:
    """The config folder to load ``architecture`` with (``None``: diffusers' own, from the Hub)."""
    if config is not None:
        if not (Path(config) / "model_index.json").is_file():
            raise ModelLoadError(f"{config}: not a diffusers config folder (no model_index.json)")
        return Path(config)
    if architecture == "sd1":
        return SD15_CONFIG
    if architecture not in FAMILY_PIPELINES:
        check_architecture(Architecture(None, label="an unknown architecture (not a Stable Diffusion checkpoint)"),
                           name)
    if _offline():
        raise ModelLoadError(f"{name}: a {architecture} single file needs its config folder (--config) "
                             "or network access to the Hub")
    return None


def load_single_file(path: Path, *, config: Path | None = None, torch_dtype=torch.float32):
    """A ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` from one ``.safetensors`` checkpoint."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: only .safetensors checkpoints are loaded (pickle formats are refused)")
    architecture = check_single_file(path)  # before any weights are read
    config_dir = config_for(architecture, config, path.name)
    import diffusers  # ~1 s: only when weights load

    cls = getattr(diffusers, FAMILY_PIPELINES[architecture])
    kwargs = dict(**dtype_kwargs(torch_dtype))
    if config_dir is not None:
        kwargs.update(config=str(config_dir), local_files_only=True)
    if cls is diffusers.StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # one line for the user; the cause stays chained for debugging
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise ModelLoadError(f"{path.name}: cannot load this {architecture} checkpoint ({first})") from exc


def single_file_configs(path: Path, config: Path | None = None) -> dict[str, dict | None] | None:
    """The configs a checkpoint loads with (its config folder's model index, UNet, scheduler, VAE), read without
    its weights; None when diffusers would fetch them from the Hub with the weights (an SD 2.x/SDXL file online
    with no --config). Refuses what :func:`load_single_file` refuses."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: only .safetensors checkpoints are loaded (pickle formats are refused)")
    config_dir = config_for(check_single_file(path), config, path.name)
    return read_folder_configs(config_dir) if config_dir is not None else None


# ------------------------------------------------------------------------------------------------ export


def _resnet_unet(src: str, dst: str) -> list[tuple[str, str]]:
    pairs = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    return [(f"{src}.{a}", f"{dst}.{b}") for a, b in pairs]


def unet_prefix_map(config) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs for a UNet2DConditionModel config."""
    layers = config.layers_per_block
    n = len(config.block_out_channels)
    m: list[tuple[str, str]] = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                                ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    for i in range(n):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            m += _resnet_unet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0")
            m.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1"))
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op"))
    m += _resnet_unet("mid_block.resnets.0", "middle_block.0")
    m.append(("mid_block.attentions.0", "middle_block.1"))
    m += _resnet_unet("mid_block.resnets.1", "middle_block.2")
    for i, kind in enumerate(config.up_block_types):
        has_attention = "CrossAttn" in kind
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            m += _resnet_unet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0")
            m.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1"))
        if i < n - 1:
            m.append((f"up_blocks.{i}.upsamplers.0.conv",
                      f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}.conv"))
    return m


def _vae_prefix_map(config) -> list[tuple[str, str]]:
    n = len(config.block_out_channels)
    layers = config.layers_per_block
    resnet = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
              ("conv_shortcut", "nin_shortcut")]
    m: list[tuple[str, str]] = [("encoder.conv_norm_out", "encoder.norm_out"),
                                ("decoder.conv_norm_out", "decoder.norm_out")]
    for side in ("encoder", "decoder"):
        for r, ldm in ((0, "block_1"), (1, "block_2")):
            m += [(f"{side}.mid_block.resnets.{r}.{a}", f"{side}.mid.{ldm}.{b}") for a, b in resnet]
        m += [(f"{side}.mid_block.attentions.0.{a}", f"{side}.mid.attn_1.{b}")
              for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                           ("to_out.0", "proj_out"))]
    for i in range(n):
        for j in range(layers):
            m += [(f"encoder.down_blocks.{i}.resnets.{j}.{a}", f"encoder.down.{i}.block.{j}.{b}") for a, b in resnet]
        m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        for j in range(layers + 1):
            m += [(f"decoder.up_blocks.{i}.resnets.{j}.{a}", f"decoder.up.{n - 1 - i}.block.{j}.{b}")
                  for a, b in resnet]
        m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv"))
    return m


def _rename(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    ordered = sorted(prefixes, key=lambda p: -len(p[0]))  # longest prefix first
    out = {}
    for key, value in state.items():
        for src, dst in ordered:
            if key == src or key.startswith(src + "."):
                key = dst + key[len(src):]
                break
        out[key] = value
    return out


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original LDM (A1111/ComfyUI) key names."""
    out: dict[str, torch.Tensor] = {}
    unet = _rename(pipe.unet.state_dict(), unet_prefix_map(pipe.unet.config))
    out.update({f"model.diffusion_model.{k}": v for k, v in unet.items()})
    vae = _rename(pipe.vae.state_dict(), _vae_prefix_map(pipe.vae.config))
    for k, v in vae.items():
        if ".mid.attn_1." in k and k.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # LDM's VAE attention uses 1×1 convs
        out[f"first_stage_model.{k}"] = v
    for k, v in pipe.text_encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        name = k if k.startswith("text_model.") else f"text_model.{k}"
        out[f"cond_stage_model.transformer.{name}"] = v
    return out


def save_single_file(pipe, path: Path, *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipe`` as one LDM-layout ``.safetensors`` checkpoint, atomically."""
    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in ldm_state_dict(pipe).items()}
    return save_atomic(state, path, metadata)


def checkpoint_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())
