"""The studio's library: adapter files on disk, with their metadata; import and export between formats."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .adapter_files import export_lora, load_lora
from .errors import UserError
from .paths import ASSETS
from .paths import safe_name
from .safetensors_files import read_metadata


EXAMPLE_CONCEPTS = ASSETS / "concepts"  # the shipped concept LoRAs (a heart, a ring) of the micro world


@dataclass
class AdapterEntry:
    path: Path
    method: str
    format: str
    rank: str
    triggers: str
    base_fingerprint: str
    matches_model: bool | None  # None: the file does not say which base it was trained on
    size_kb: int

    @property
    def name(self) -> str:
        return self.path.name


EXAMPLE_SUFFIX = " (example)"


def adapters_folder(home: Path) -> Path:
    return home / "adapters"


def library_entries(folder: Path, fingerprint: str | None = None) -> tuple[list[AdapterEntry], list[str]]:
    """The user's adapters, then the shipped example concepts (``name (example)``): what the Library lists."""
    entries, problems = list_adapters(folder, fingerprint)
    examples, bad = list_adapters(EXAMPLE_CONCEPTS, fingerprint)
    return entries + examples, problems + bad


def library_label(entry: AdapterEntry) -> str:
    return entry.name + (EXAMPLE_SUFFIX if entry.path.parent.resolve() == EXAMPLE_CONCEPTS.resolve() else "")


def library_path(label: str, folder: Path) -> Path:
    """The file behind a Library label: a shipped example, or a file of the user's folder (by name only)."""
    if label.endswith(EXAMPLE_SUFFIX):
        return EXAMPLE_CONCEPTS / Path(label.removesuffix(EXAMPLE_SUFFIX)).name
    return folder / Path(label).name


def describe(path: Path, fingerprint: str | None) -> AdapterEntry:
    meta = read_metadata(path)
    base = meta.get("atelier.base_fingerprint", "")
    return AdapterEntry(
        path=path,
        method=meta.get("atelier.method") or ("lora" if meta.get("ss_network_module") else "?"),
        format=meta.get("atelier.format", "kohya" if meta.get("ss_network_module") else "?"),
        rank=meta.get("ss_network_dim", ""),
        triggers=meta.get("atelier.trigger_words", meta.get("modelspec.trigger_phrase", "")),
        base_fingerprint=base,
        matches_model=(base == fingerprint) if base and fingerprint else None,
        size_kb=path.stat().st_size // 1024,
    )


def list_adapters(folder: Path, fingerprint: str | None = None) -> tuple[list[AdapterEntry], list[str]]:
    """Readable adapters (sorted by name) and one line per file that could not be read."""
    entries, problems = [], []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            entries.append(describe(path, fingerprint))
        except UserError as exc:
            problems.append(str(exc))
    return entries, problems


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


def import_adapter(upload: Path, folder: Path, pipe, original_name: str | None = None) -> Path:
    """Check that ``upload`` is a LoRA this studio can read, then copy it in (never over an existing file)."""
    name = safe_name(original_name or Path(upload).name, "adapter.safetensors")
    if not name.lower().endswith(".safetensors"):
        raise UserError(f"{name}: only .safetensors adapter files are imported")
    load_lora(Path(upload), pipe)  # raises a one-line UserError for anything unreadable
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, name)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(upload, tmp)
    tmp.replace(target)
    return target


def export_adapter(path: Path, fmt: str, folder: Path, pipe=None) -> Path:
    """Write ``path`` in the other tool's format next to it: ``NAME.kohya.safetensors`` or ``NAME.diffusers...``."""
    if fmt not in ("diffusers", "kohya"):
        raise UserError(f"unknown format {fmt!r} (diffusers or kohya)")
    stem = path.name.removesuffix(".safetensors")
    for other in (".kohya", ".diffusers"):
        stem = stem.removesuffix(other)
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, f"{stem}.{fmt}.safetensors")
    export_lora(path, target, fmt, pipe)
    return target
