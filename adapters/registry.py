"""Every adapter type the studio knows, found from the folders of :mod:`adapters` that declare ``ADAPTER``; and the
one place that tells which type a file is and reads it.

Generation, LoRA-Composer, the Library and the watermark all ask here, so a file is sniffed one way everywhere.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any, Mapping

import adapters
from adapters.adapter_type import AdapterType
from core.errors import UserError


@functools.cache
def adapter_types() -> dict[str, AdapterType]:
    """Name → type, in display order (each subpackage of ``adapters`` with an ``ADAPTER`` declaration)."""
    found: list[AdapterType] = []
    for info in pkgutil.iter_modules(adapters.__path__):
        if not info.ispkg:
            continue
        declared = getattr(importlib.import_module(f"adapters.{info.name}"), "ADAPTER", None)
        if declared is not None:
            found.append(declared)
    names = [t.name for t in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two adapter folders declare the same name: {sorted(names)}")
    if sum(t.detect is None for t in found) != 1:
        raise RuntimeError("exactly one adapter type must be the fallback (detect=None)")
    return {t.name: t for t in sorted(found, key=lambda t: (t.order, t.name))}


def adapter_type(name: str) -> AdapterType:
    try:
        return adapter_types()[name]
    except KeyError:
        raise UserError(f"unknown adapter type {name!r} ({', '.join(adapter_types())})") from None


def file_metadata(path: Path) -> dict[str, str]:
    """A file's safetensors metadata, or {} when the header cannot be read (the reader then says why)."""
    from core.safetensors_files import read_header  # deferred: torch; the registry also builds `--help`

    try:
        return {str(k): str(v) for k, v in (read_header(Path(path)).get("__metadata__") or {}).items()}
    except Exception:
        return {}


def identify(path: Path, metadata: Mapping[str, str] | None = None) -> AdapterType:
    """The type of an adapter file, from its header only (any file may be asked; the fallback is plain LoRA, whose
    reader explains what is wrong with a file that is no adapter at all)."""
    meta = file_metadata(path) if metadata is None else metadata
    types = list(adapter_types().values())
    for kind in types:
        if kind.detect is not None and kind.detect(meta):
            return kind
    return next(kind for kind in types if kind.detect is None)


def read_adapter(path: Path, pipe=None, kind: AdapterType | None = None) -> Any:
    """The file read by its type's reader (a ``LoraAdapter`` or a ``SparseDelta``); every problem a ``UserError``."""
    from adapters.lora.files import load_lora  # deferred: torch; the registry also builds `--help`
    from adapters.sara.files import load_sparse_delta

    kind = kind or identify(path)
    if kind.reader == "sparse_delta":
        return load_sparse_delta(Path(path))
    return load_lora(Path(path), pipe)


def is_decoder_adapter(path: Path) -> bool:
    """A watermark-style adapter (it changes the VAE decoder): applied as the watermark, never as a concept."""
    return identify(path).role == "decoder"


def library_columns() -> list[tuple[str, str]]:
    """(title, metadata key) of every type's own Library columns, each title once, in type order."""
    seen: dict[str, str] = {}
    for kind in adapter_types().values():
        for column in kind.columns:
            seen.setdefault(column.title, column.metadata_key)
    return list(seen.items())
