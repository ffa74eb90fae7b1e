"""The studio's library: adapter files on disk, with their metadata; import and export between formats."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from adapters.adapter_type import AdapterType
from adapters.lora.files import export_lora
from adapters.registry import identify, library_columns, read_adapter
from core.errors import UserError
from core.paths import ASSETS
from core.paths import safe_name
from core.safetensors_files import read_metadata


EXAMPLE_CONCEPTS = ASSETS / "concepts"  # the shipped concept LoRAs (a heart, a ring) of the micro world


@dataclass
class AdapterEntry:
    path: Path
    kind: AdapterType  # what the registry says the file is
    method: str  # the file's own atelier.method (or "lora" for kohya files)
    format: str
    rank: str
    triggers: str
    base_fingerprint: str
    matches_model: bool | None  # None: the file does not say which base it was trained on
    size_kb: int
    columns: dict[str, str]  # the adapter types' own Library columns (title → value; "" where not applicable)

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
    meta = read_metadata(path)  # a one-line UserError for a file that is no safetensors file
    base = meta.get("atelier.base_fingerprint", "")
    kind = identify(path, meta)
    own = {column.title for column in kind.columns}
    return AdapterEntry(
        path=path,
        kind=kind,
        method=meta.get("atelier.method") or ("lora" if meta.get("ss_network_module") else "?"),
        format=meta.get("atelier.format", "kohya" if meta.get("ss_network_module") else "?"),
        rank=meta.get("ss_network_dim", ""),
        triggers=meta.get("atelier.trigger_words", meta.get("modelspec.trigger_phrase", "")),
        base_fingerprint=base,
        matches_model=(base == fingerprint) if base and fingerprint else None,
        size_kb=path.stat().st_size // 1024,
        columns={title: meta.get(key, "") if title in own else "" for title, key in library_columns()},
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
    """Check that ``upload`` is an adapter this studio can read (any registered type), then copy it in (never over
    an existing file)."""
    name = safe_name(original_name or Path(upload).name, "adapter.safetensors")
    if not name.lower().endswith(".safetensors"):
        raise UserError(f"{name}: only .safetensors adapter files are imported")
    read_adapter(Path(upload), pipe)  # raises a one-line UserError for anything unreadable
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, name)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(upload, tmp)
    tmp.replace(target)
    return target


def export_adapter(path: Path, fmt: str, folder: Path, pipe=None) -> Path:
    """Write ``path`` in the other tool's format next to it: ``NAME.kohya.safetensors`` or ``NAME.diffusers...``."""
    kind = identify(path)
    if fmt not in kind.export_formats:
        formats = " or ".join(kind.export_formats)
        raise UserError(f"{path.name}: a {kind.label} " + (f"exports to {formats}, not {fmt!r}" if formats
                                                         else "cannot be exported to another format"))
    stem = path.name.removesuffix(".safetensors")
    for other in (".kohya", ".diffusers"):
        stem = stem.removesuffix(other)
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, f"{stem}.{fmt}.safetensors")
    export_lora(path, target, fmt, pipe)
    return target


def _own_file(name: str, folder: Path) -> Path:
    """A file of the user's adapters folder, by name only (a shipped example or a path elsewhere is refused)."""
    if name.endswith(EXAMPLE_SUFFIX) or Path(name).name != name:
        raise UserError(f"{name}: only adapters of your own folder ({folder}) can be changed; shipped examples stay")
    path = folder / name
    if not path.is_file():
        raise UserError(f"{name}: no such adapter in {folder}")
    return path


def delete_adapter(name: str, folder: Path) -> Path:
    """Remove one adapter file of the user's folder (nothing else: its run folder and other formats stay)."""
    path = _own_file(name, folder)
    path.unlink()
    return path


def rename_adapter(name: str, new_name: str, folder: Path) -> Path:
    """Rename an adapter file within the user's folder; never over an existing file."""
    path = _own_file(name, folder)
    new = safe_name(new_name.strip(), "")
    if not new:
        raise UserError("Type a new name.")
    if not new.lower().endswith(".safetensors"):
        new += ".safetensors"
    target = folder / new
    if target.exists():
        raise UserError(f"{new} exists already: choose another name")
    path.rename(target)
    return target


def export_formats(path: Path) -> tuple[str, ...]:
    """The formats the Library can write this adapter in (none for a watermark, a SaRA delta, ...)."""
    return tuple(identify(path).export_formats)
