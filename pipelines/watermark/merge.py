"""A watermark adapter in use: merged into a pipeline's VAE decoder, for one generation or for good.

A merged decoder is what a model owner ships: every image any user decodes with it carries the key. The adapter's
layers all live under ``vae.``; merging goes through the same code as every other LoRA merge.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from adapters.lora.files import load_lora
from core.errors import UserError
from models.loading import load_model
from adapters.lora.apply import merge_lora
from adapters.registry import identify


def is_watermark_file(path: Path) -> bool:
    """A decoder adapter by the registry's reading of its header (any file may be asked)."""
    return identify(Path(path)).role == "decoder"


def load_watermark(path: Path):
    """The adapter of a watermark file (only ``vae.decoder`` layers allowed)."""
    adapter = load_lora(Path(path))
    if adapter.metadata.get("atelier.method") != "watermark":
        raise UserError(f"{Path(path).name}: not a watermark adapter")
    stray = [n for n in adapter.layers if not n.startswith("vae.decoder.")]
    if stray:
        raise UserError(f"{Path(path).name}: a watermark adapter changes only the VAE decoder (found {stray[0]})")
    return adapter


def _merge(pipe, adapter, path: Path) -> None:
    """``merge_lora`` with the file named in its refusals (a decoder of another shape)."""
    try:
        merge_lora(pipe, adapter)
    except UserError as exc:
        raise UserError(f"{Path(path).name}: {exc}") from exc


@contextmanager
def watermark_applied(pipe, path: Path | None) -> Iterator[None]:
    """Merge the watermark into ``pipe``'s decoder for the block; the exact decoder weights come back after."""
    if path is None:
        yield
        return
    adapter = load_watermark(Path(path))
    saved = {name: module.weight.detach().clone() for name, module in pipe.vae.named_modules()
             if f"vae.{name}" in adapter.layers}
    _merge(pipe, adapter, path)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, module in pipe.vae.named_modules():
                if name in saved:
                    module.weight.copy_(saved[name])


def merge_into_folder(adapter_path: Path, out: Path, model: str | None = None) -> Path:
    """A full diffusers pipeline folder whose decoder carries the watermark (the key stays in the adapter only)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: the folder exists and is not empty")
    adapter = load_watermark(adapter_path)
    loaded = load_model(model, dtype="fp32")
    _merge(loaded.pipe, adapter, adapter_path)
    loaded.pipe.save_pretrained(out, safe_serialization=True)
    return out
