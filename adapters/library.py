"""The studio's library: adapter files on disk, with their metadata and where they came from (created, steps,
dataset, base model, run folder and its last preview); import, and export between formats.

One entry per adapter: an export is written to ``<adapters folder>/exports/NAME-FORMAT.safetensors`` (a subfolder,
so Generate's and Compose's lists, which read the folder's own files, never show it as a second adapter) and the
entry lists it among its formats. Rename and delete take an adapter's exported copies along."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from adapters.adapter_type import AdapterType
from adapters.lora.files import detect_format, export_lora
from adapters.registry import identify, library_columns, read_adapter
from core.errors import UserError
from core.paths import ASSETS
from core.paths import safe_name
from core.run_provenance import CREATED_KEY, RUN_DIR_KEY, STEPS_KEY, last_preview
from core.safetensors_files import read_header


EXAMPLE_CONCEPTS = ASSETS / "concepts"  # the shipped concept LoRAs (a heart, a ring) of the micro world
EXPORTS = "exports"  # the subfolder of the adapters folder that exports go to
# The keys of ``atelier.settings`` that name a run's training images, by trainer: LoRA-type runs (``data``), the
# watermark (``images``), the upscaler's fine-tuning (``hr_folder``) and pre-training (``photos``).
DATASET_SETTINGS = ("data", "dataset", "images", "hr_folder", "photos")
STEPS_SETTINGS = ("max_steps", "steps")  # the steps a run was set to (the run's own count is STEPS_KEY)


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
    created: str = ""  # YYYY-MM-DDTHH:MM:SS
    created_from: str = ""  # "run" (stamped by its run), "modelspec.date" or "file time"
    steps: str = ""  # the steps its run reached, else the steps it was set to; "" when the file does not say
    dataset: str = ""  # the training images' folder as the run was given it; "" when the file does not say
    base_model: str = ""  # the base model's name as the file records it (ss_sd_model_name)
    run_dir: Path | None = None  # the run folder the file came from (it may have been deleted since)
    exports: dict[str, Path] = field(default_factory=dict)  # format → this adapter's exported copy

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run_name(self) -> str:
        """The run folder's name, as the Train tab's Runs list shows it ("" when the file has no run)."""
        return self.run_dir.name if self.run_dir else ""

    @cached_property
    def thumbnail(self) -> Path | None:
        """The run's last preview sample (read from its event log only when asked: the lists do not need it)."""
        return last_preview(self.run_dir) if self.run_dir else None

    def stale_exports(self) -> list[str]:
        """Formats whose exported copy is older than the adapter file (it was trained or written again since)."""
        try:
            mtime = self.path.stat().st_mtime
            return [fmt for fmt, copy in self.exports.items() if copy.stat().st_mtime < mtime]
        except OSError:
            return []

    def formats_label(self) -> str:
        """The file's own format, then each exported copy: ``diffusers; kohya → exports/NAME-kohya.safetensors``."""
        stale = self.stale_exports()
        return "; ".join([self.format, *(f"{fmt} → {EXPORTS}/{copy.name}"
                                         + (" (older than the adapter: export again)" if fmt in stale else "")
                                         for fmt, copy in self.exports.items())])

    @property
    def dataset_name(self) -> str:
        """The training images' folder name (its full path is :attr:`dataset`)."""
        return Path(self.dataset.replace("\\", "/")).name if self.dataset else ""

    def created_label(self) -> str:
        """``YYYY-MM-DD HH:MM`` (a date other tools wrote in another form: as written)."""
        return self.created.replace("T", " ")[:16]


EXAMPLE_SUFFIX = " (example)"


def adapters_folder(home: Path) -> Path:
    return home / "adapters"


def library_entries(folder: Path, fingerprint: str | None = None) -> tuple[list[AdapterEntry], list[str]]:
    """The user's adapters, then the shipped example concepts (``name (example)``), each with its exported copies
    (``folder/exports``): what the Library lists."""
    entries, problems = list_adapters(folder, fingerprint, exports_folder(folder))
    examples, bad = list_adapters(EXAMPLE_CONCEPTS, fingerprint, exports_folder(folder))
    return entries + examples, problems + bad


def library_label(entry: AdapterEntry) -> str:
    return entry.name + (EXAMPLE_SUFFIX if is_example(entry.path) else "")


def library_path(label: str, folder: Path) -> Path:
    """The file behind a Library label: a shipped example, or a file of the user's folder (by name only)."""
    if label.endswith(EXAMPLE_SUFFIX):
        return EXAMPLE_CONCEPTS / Path(label.removesuffix(EXAMPLE_SUFFIX)).name
    return folder / Path(label).name


def exports_folder(folder: Path) -> Path:
    return folder / EXPORTS


def is_example(path: Path) -> bool:
    return path.parent.resolve() == EXAMPLE_CONCEPTS.resolve()


def export_path(path: Path, fmt: str, exports: Path) -> Path:
    """Where ``path``'s copy in ``fmt`` goes: ``exports/NAME-FORMAT.safetensors`` (a shipped example's
    ``NAME-example-FORMAT``, so it never passes for the copy of an own file of the same name)."""
    stem = path.name.removesuffix(".safetensors") + ("-example" if is_example(path) else "")
    return exports / f"{stem}-{fmt}.safetensors"


def _settings(meta: dict[str, str]) -> dict:
    try:
        settings = json.loads(meta.get("atelier.settings") or "{}")
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}


def _read(path: Path) -> tuple[dict[str, str], str]:
    """The file's metadata and format: as the file says, else as its tensor names show (``?`` when neither does)."""
    header = read_header(path)  # a one-line UserError for a file that is no safetensors file
    meta = dict(header.get("__metadata__") or {})
    if meta.get("atelier.format"):
        return meta, meta["atelier.format"]
    detected = detect_format(header)
    if detected in ("diffusers", "kohya"):
        return meta, detected
    return meta, "kohya" if meta.get("ss_network_module") else "?"


def _created(path: Path, meta: dict[str, str]) -> tuple[str, str]:
    if meta.get(CREATED_KEY):
        return meta[CREATED_KEY], "run"
    if meta.get("modelspec.date"):
        return meta["modelspec.date"], "modelspec.date"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime)), "file time"


def describe(path: Path, fingerprint: str | None, exports: Path | None = None) -> AdapterEntry:
    """One adapter file as the Library shows it; ``exports``: the folder its exported copies are looked for in."""
    meta, fmt = _read(path)
    base = meta.get("atelier.base_fingerprint", "")
    kind = identify(path, meta)
    own = {column.title for column in kind.columns}
    settings = _settings(meta)
    created, created_from = _created(path, meta)
    dataset = next((str(settings[key]) for key in DATASET_SETTINGS if settings.get(key)), "")
    copies = {} if exports is None else {
        other: export_path(path, other, exports) for other in kind.export_formats if other != fmt}
    return AdapterEntry(
        path=path,
        kind=kind,
        method=meta.get("atelier.method") or ("lora" if meta.get("ss_network_module") else "?"),
        format=fmt,
        rank=meta.get("ss_network_dim", ""),
        triggers=meta.get("atelier.trigger_words", meta.get("modelspec.trigger_phrase", "")),
        base_fingerprint=base,
        matches_model=(base == fingerprint) if base and fingerprint else None,
        size_kb=path.stat().st_size // 1024,
        columns={title: meta.get(key, "") if title in own else "" for title, key in library_columns()},
        created=created,
        created_from=created_from,
        steps=meta.get(STEPS_KEY) or next((str(settings[key]) for key in STEPS_SETTINGS if settings.get(key)), ""),
        dataset=dataset,
        base_model=meta.get("ss_sd_model_name", ""),
        run_dir=Path(meta[RUN_DIR_KEY]) if meta.get(RUN_DIR_KEY) else None,
        exports={other: copy for other, copy in copies.items() if copy.is_file()},
    )


def library_entry(path: Path, folder: Path, fingerprint: str | None = None) -> AdapterEntry:
    """One file as the Library lists it: with its exported copies when it is one of the Library's files."""
    listed = path.parent.resolve() in (folder.resolve(), EXAMPLE_CONCEPTS.resolve())
    return describe(path, fingerprint, exports_folder(folder) if listed else None)


def entry_details(entry: AdapterEntry) -> dict:
    """What the Library says about an entry beyond its table row, as plain fields (the CLI's ``adapter info``)."""
    return {"created": entry.created, "created_from": entry.created_from, "method": entry.method,
            "steps": entry.steps, "dataset": entry.dataset_name, "dataset_folder": entry.dataset,
            "base_model": entry.base_model, "base_fingerprint": entry.base_fingerprint, "triggers": entry.triggers,
            "format": entry.format, "formats": entry.formats_label(),
            "exports": {fmt: str(copy) for fmt, copy in entry.exports.items()},
            "run": entry.run_name, "run_dir": str(entry.run_dir or ""), "thumbnail": str(entry.thumbnail or "")}


def list_adapters(folder: Path, fingerprint: str | None = None,
                  exports: Path | None = None) -> tuple[list[AdapterEntry], list[str]]:
    """Readable adapters (sorted by name) and one line per file that could not be read: the folder's own files only
    (not its ``exports`` subfolder)."""
    entries, problems = [], []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            entries.append(describe(path, fingerprint, exports))
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
    """Write ``path`` in the other tool's format to ``folder/exports/NAME-FORMAT.safetensors`` (a copy written
    before is replaced: it is the same conversion of the same file)."""
    kind = identify(path)
    if fmt not in kind.export_formats:
        formats = " or ".join(kind.export_formats)
        raise UserError(f"{path.name}: a {kind.label} " + (f"exports to {formats}, not {fmt!r}" if formats
                                                         else "cannot be exported to another format"))
    if fmt not in export_formats(path):
        raise UserError(f"{path.name} is a {fmt} file already: export it to " + " or ".join(export_formats(path)))
    target = export_path(path, fmt, exports_folder(folder))
    target.parent.mkdir(parents=True, exist_ok=True)
    export_lora(path, target, fmt, pipe)
    return target


def exported_copies(path: Path, folder: Path) -> list[Path]:
    """The exported copies of one of the Library's files that exist."""
    return list(library_entry(path, folder).exports.values())


def _own_file(name: str, folder: Path) -> Path:
    """A file of the user's adapters folder, by name only (a shipped example or a path elsewhere is refused)."""
    if name.endswith(EXAMPLE_SUFFIX) or Path(name).name != name:
        raise UserError(f"{name}: only adapters of your own folder ({folder}) can be changed; shipped examples stay")
    path = folder / name
    if not path.is_file():
        raise UserError(f"{name}: no such adapter in {folder}")
    return path


def delete_adapter(name: str, folder: Path) -> list[Path]:
    """Remove one adapter file of the user's folder and its exported copies (an entry of the Library is the adapter
    with its formats; a copy left behind would pass for the export of a later file of that name). Its run folder
    stays. The removed files, the adapter first."""
    path = _own_file(name, folder)
    copies = exported_copies(path, folder)
    path.unlink()
    for copy in copies:
        copy.unlink(missing_ok=True)
    return [path, *copies]


def rename_adapter(name: str, new_name: str, folder: Path) -> Path:
    """Rename an adapter file within the user's folder, its exported copies along; never over an existing file."""
    path = _own_file(name, folder)
    new = safe_name(new_name.strip(), "")
    if not new:
        raise UserError("Type a new name.")
    if not new.lower().endswith(".safetensors"):
        new += ".safetensors"
    target = folder / new
    if target.exists():
        raise UserError(f"{new} exists already: choose another name")
    entry = library_entry(path, folder)
    moves = [(copy, export_path(target, fmt, copy.parent)) for fmt, copy in entry.exports.items()]
    for _, new_copy in moves:
        if new_copy.exists():
            raise UserError(f"{EXPORTS}/{new_copy.name} exists already: choose another name")
    path.rename(target)
    for copy, new_copy in moves:
        copy.rename(new_copy)
    return target


def export_formats(path: Path) -> tuple[str, ...]:
    """The formats the Library can write this adapter in: its type's (none for a watermark, a SaRA delta, ...) but
    the one it is in already."""
    meta, own = _read(path)
    return tuple(fmt for fmt in identify(path, meta).export_formats if fmt != own)
