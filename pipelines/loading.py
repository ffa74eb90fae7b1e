"""Load a base model from a diffusers folder, a single-file checkpoint or a Hub id; pick device, dtype, attention.

Every failure a user can cause (missing path, wrong kind of file, truncated file, unsupported architecture) is a
``ModelLoadError`` with one readable line; nothing here assumes CUDA or CPU.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .devices import Runtime, apply_attention, dtype_kwargs, resolve_runtime
from .errors import ModelLoadError
from .fingerprint import pipeline_fingerprint

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
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
    from .paths import ASSETS

    micro = ASSETS / "micro-sd"
    if (micro / "model_index.json").is_file():
        return micro
    from .tiny_model import ensure_tiny_model

    return ensure_tiny_model()


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _load_folder(folder: Path, torch_dtype):
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder.name}: this folder is not a diffusers pipeline (no model_index.json)")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder.name}: model_index.json is unreadable ({exc.__class__.__name__})") from exc
    if class_name not in SUPPORTED_PIPELINES:
        raise ModelLoadError(f"{folder.name}: unsupported architecture {class_name or 'unknown'!r} "
                             f"(supported: {', '.join(SUPPORTED_PIPELINES)})")
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
    from .safetensors_files import check_safetensors_file

    for path in sorted(folder.glob("*/*.safetensors")):
        check_safetensors_file(path)
    for path in sorted(folder.glob("*/*")):
        if path.suffix in PICKLE_SUFFIXES and not path.with_suffix(".safetensors").exists():
            raise ModelLoadError(f"{path.parent.name}/{path.name}: pickle weights are not loaded; "
                                 "convert the model to .safetensors")


def _load_hub(repo_id: str, torch_dtype):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, **dtype_kwargs(torch_dtype), use_safetensors=True,
                                                 local_files_only=_hub_offline())
    except Exception as exc:
        where = "in the local Hub cache (HF_HUB_OFFLINE is set)" if _hub_offline() else "on the Hub"
        raise ModelLoadError(f"{repo_id}: not a folder or file here, and not loadable {where} "
                             f"({_one_line(exc)})") from exc
    if pipe.__class__.__name__ not in SUPPORTED_PIPELINES:
        raise ModelLoadError(f"{repo_id}: unsupported architecture {pipe.__class__.__name__!r}")
    return pipe


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else exc.__class__.__name__)


def load_model(source: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
               attention: str = "auto", config: str | Path | None = None) -> LoadedModel:
    """Load ``source`` (folder, ``.safetensors`` file, Hub id, or None for the embedded default)."""
    runtime = resolve_runtime(device, dtype, attention)
    src = Path(source).expanduser() if source not in (None, "") else default_model_source()
    if src.is_dir():
        pipe, kind = _load_folder(src, runtime.dtype), "folder"
    elif src.is_file():
        if src.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{src.name}: pickle checkpoints (.ckpt/.pt/.bin) are not loaded; "
                                 "use the .safetensors version of this model")
        if src.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{src.name}: not a model (expected a diffusers folder or a .safetensors file)")
        from .single_file import load_single_file

        pipe, kind = load_single_file(src, config=Path(config) if config else None, torch_dtype=runtime.dtype), \
            "single_file"
    elif HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        pipe, kind = _load_hub(str(source), runtime.dtype), "hub"
    else:
        raise ModelLoadError(f"{source}: no such file or folder")
    fp = pipeline_fingerprint(pipe)  # before moving, so it is computed once on whatever device the weights are
    pipe.to(runtime.device)
    apply_attention(pipe, runtime.attention)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, source=str(src if src.exists() else source), kind=kind,
                       name=src.stem if kind == "single_file" else src.name, fingerprint=fp, runtime=runtime,
                       base_scheduler=pipe.scheduler)
