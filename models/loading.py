"""Load a base model from a diffusers folder, a single-file checkpoint or a Hub id; pick device, dtype, attention.

Every failure a user can cause (missing path, wrong kind of file, truncated file, unsupported architecture) is a
``ModelLoadError`` with one readable line; nothing here assumes CUDA or CPU. The architecture is checked from the small
config files (``model_index.json``, ``unet/config.json``; a single file's header) before any weights are read: an SD3,
Flux, refiner or inpainting model is refused with one line naming it, not with a TypeError deep inside diffusers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from models.conditioning import model_family
from models.devices import Runtime, apply_attention, dtype_kwargs, resolve_runtime
from core.errors import ModelLoadError
from models.fingerprint import pipeline_fingerprint
from models.architecture import (CONFIG_FILES, Architecture, architecture_from_configs, check_architecture,
                                 names_component, read_config_json, read_folder_configs)
from core.paths import ASSETS
from core.safetensors_files import check_safetensors_file
from models.single_file import load_single_file, single_file_configs

# diffusers (~1 s), huggingface_hub and the tiny model (built with diffusers and transformers) are imported in the
# functions that load weights or reach the Hub: reading configs and headers (describe_model_source, every check
# before a load) does without them.

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MICRO_MODEL_NAME = "micro-sd"  # assets/micro-sd: the shipped micro-world base model
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    pipe: object  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    source: str
    kind: str  # "folder" | "single_file" | "hub"
    name: str
    fingerprint: str
    runtime: Runtime
    base_scheduler: object  # the model's own scheduler, kept so samplers can be swapped and restored

    @property
    def native_size(self) -> int:
        """Image side the UNet was trained for (sample_size × VAE scale factor)."""
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)


def default_model_source() -> Path:
    """The embedded default: the shipped micro model when present, else the tiny random model built on first run."""
    micro = ASSETS / MICRO_MODEL_NAME
    if (micro / "model_index.json").is_file():
        return micro
    from models.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def _hub_configs(repo_id: str) -> dict[str, dict | None]:
    """The same config files of a Hub repository (from the local cache when offline): kilobytes, not weights."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> dict | None:
        path = hf_hub_download(repo_id, filename, local_files_only=_hub_offline())
        return read_config_json(Path(path), repo_id)

    try:
        index = fetch("model_index.json")
    except Exception as exc:  # not on the Hub, not cached, no network: the user needs one line
        where = "in the local Hub cache (HF_HUB_OFFLINE is set)" if _hub_offline() else "on the Hub"
        raise ModelLoadError(f"{repo_id}: not a folder or file here, and not loadable {where} "
                             f"({_one_line(exc)})") from exc
    configs: dict[str, dict | None] = {"index": index}
    for part, file in CONFIG_FILES:
        try:
            configs[part] = fetch(f"{part}/{file}")
        except ModelLoadError:
            raise
        except Exception:  # a pipeline without that component (SD3 has no unet/): the index decides
            configs[part] = None
    return configs


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _load_folder(folder: Path, torch_dtype):
    configs = read_folder_configs(folder)
    architecture = architecture_from_configs(configs["index"], configs["unet"])
    check_architecture(architecture, folder.name)  # before any weight file is opened
    class_name = str(architecture.class_name)
    _check_weight_files(folder)
    cls = _pipeline_class(class_name)
    kwargs = {**dtype_kwargs(torch_dtype), "local_files_only": True}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(folder, **kwargs)
    except Exception as exc:  # diffusers raises many kinds; the user needs one line
        raise ModelLoadError(f"{folder.name}: cannot load this pipeline folder ({_one_line(exc)})") from exc


def _check_weight_files(folder: Path) -> None:
    for path in sorted(folder.glob("*/*.safetensors")):
        check_safetensors_file(path)
    for path in sorted(folder.glob("*/*")):
        if path.suffix in PICKLE_SUFFIXES and not path.with_suffix(".safetensors").exists():
            raise ModelLoadError(f"{path.parent.name}/{path.name}: pickle weights are not loaded; "
                                 "convert the model to .safetensors")


def _load_hub(repo_id: str, torch_dtype):
    from diffusers import DiffusionPipeline

    configs = _hub_configs(repo_id)
    check_architecture(architecture_from_configs(configs["index"], configs["unet"]), repo_id)  # before the download
    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, **dtype_kwargs(torch_dtype), use_safetensors=True,
                                                 local_files_only=_hub_offline())
    except Exception as exc:
        where = "in the local Hub cache (HF_HUB_OFFLINE is set)" if _hub_offline() else "on the Hub"
        raise ModelLoadError(f"{repo_id}: not a folder or file here, and not loadable {where} "
                             f"({_one_line(exc)})") from exc
    check_architecture(Architecture(pipe.__class__.__name__), repo_id)  # what loaded is what the index said
    return pipe


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else exc.__class__.__name__)


def _source(source: str | Path | None) -> tuple[Path, str]:
    """Where ``source`` is and what kind ("folder" | "single_file" | "hub"), or a one-line refusal of a path that
    is no model; None or "" is the embedded default."""
    src = Path(source).expanduser() if source not in (None, "") else default_model_source()
    if src.is_dir():
        return src, "folder"
    if src.is_file():
        if src.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{src.name}: pickle checkpoints (.ckpt/.pt/.bin) are not loaded; "
                                 "use the .safetensors version of this model")
        if src.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{src.name}: not a model (expected a diffusers folder or a .safetensors file)")
        return src, "single_file"
    if HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return src, "hub"
    raise ModelLoadError(f"{source}: no such file or folder")


def load_model(source: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
               attention: str = "auto", config: str | Path | None = None) -> LoadedModel:
    """Load ``source`` (folder, ``.safetensors`` file, Hub id, or None for the embedded default)."""
    runtime = resolve_runtime(device, dtype, attention)
    src, kind = _source(source)
    if kind == "folder":
        pipe = _load_folder(src, runtime.dtype)
    elif kind == "single_file":
        pipe = load_single_file(src, config=Path(config) if config else None, torch_dtype=runtime.dtype)
    else:
        pipe = _load_hub(str(source), runtime.dtype)
    fp = pipeline_fingerprint(pipe)  # before moving, so it is computed once on whatever device the weights are
    pipe.to(runtime.device)
    apply_attention(pipe, runtime.attention)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, source=str(src if src.exists() else source), kind=kind,
                       name=src.stem if kind == "single_file" else src.name, fingerprint=fp, runtime=runtime,
                       base_scheduler=pipe.scheduler)


def is_micro_model(source: str | Path | None) -> bool:
    """Whether ``source`` is the shipped micro-world model (None: the embedded default, when the micro model ships).
    Only it draws the micro world, so the scene generator's sets are offered for it alone."""
    micro = ASSETS / MICRO_MODEL_NAME
    if not (micro / "model_index.json").is_file():
        return False
    if source in (None, ""):
        return True
    try:
        return Path(source).expanduser().resolve() == micro.resolve()
    except (OSError, RuntimeError):
        return False


def config_view(configs: dict[str, dict | None]) -> SimpleNamespace:
    """A stand-in for a pipeline that holds only its configs: what ``conditioning.model_family`` and
    ``ModelFamily.describe`` read (second text encoder, UNet and scheduler configs, VAE scale factor)."""
    from diffusers.configuration_utils import FrozenDict

    vae = configs.get("vae")
    scale = 2 ** (len(vae.get("block_out_channels", ())) - 1) if vae else 8  # as the SD pipelines compute it
    return SimpleNamespace(unet=SimpleNamespace(config=FrozenDict(configs.get("unet") or {})),
                           scheduler=SimpleNamespace(config=FrozenDict(configs.get("scheduler") or {})),
                           text_encoder_2=True if names_component(configs["index"].get("text_encoder_2")) else None,
                           vae_scale_factor=scale)


def unet_layout(source: str | Path | None) -> SimpleNamespace | None:
    """A weightless stand-in of the model's UNet (built on torch's meta device from ``unet/config.json``), so that
    adapter files can be resolved against its module names and shapes before any weight loads (a kohya file's SDXL
    block numbering depends on the layout). None where only loading tells (single files, Hub ids)."""
    import torch
    from diffusers import UNet2DConditionModel  # deferred: heavy, and this module is imported by --help

    src, kind = _source(source)
    unet_config = read_folder_configs(src).get("unet") if kind == "folder" else None
    if not unet_config:
        return None
    with torch.device("meta"):
        return SimpleNamespace(unet=UNet2DConditionModel.from_config(unet_config))


def describe_model_source(source: str | Path | None, config: str | Path | None = None) -> str:
    """The model's family in one line ("SDXL (2 text encoders, epsilon, 1024 px)") for the Train tab, read from the
    config files: pages show it and must not load gigabytes of weights for it. A model the studio cannot use is
    refused as :func:`load_model` refuses it. Remembered per source (a single file may need one load)."""
    return _family_and_description(str(source or ""), str(config or ""))[1]


def source_family(source: str | Path | None, config: str | Path | None = None) -> str:
    """The family whose training presets fit the model: ``micro`` for the shipped micro-world model, else ``sd1``,
    ``sd2`` or ``sdxl`` (read from the config files, as :func:`describe_model_source`)."""
    if is_micro_model(source):
        return "micro"
    return _family_and_description(str(source or ""), str(config or ""))[0]


@lru_cache(maxsize=32)
def _family_and_description(source: str, config: str) -> tuple[str, str]:
    src, kind = _source(source or None)
    if kind == "single_file":
        configs = single_file_configs(src, Path(config) if config else None)
        if configs is None:  # its configs come from the Hub with the weights: load it once
            model = load_model(src)
            family = model_family(model.pipe)
            return family.key, family.describe(model.pipe)
    else:
        configs = read_folder_configs(src) if kind == "folder" else _hub_configs(str(source))
        check_architecture(architecture_from_configs(configs["index"], configs["unet"]),
                           src.name if kind == "folder" else source)
    if configs.get("unet") is None:
        raise ModelLoadError(f"{src.name if kind == 'folder' else source}: no unet/config.json")
    view = config_view(configs)
    family = model_family(view)
    return family.key, family.describe(view)
