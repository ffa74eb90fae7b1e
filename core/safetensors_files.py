"""Checks on ``.safetensors`` files before anything loads them.

Why: a truncated download or a renamed pickle otherwise surfaces as a deep library error (or, for pickles, as code
execution). Reading only the 8-byte length and the JSON header is enough to tell a whole file from a broken one.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors.torch import load_file, save_file

from core.atomic_files import replacing
from core.errors import ModelLoadError

MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> dict:
    """The parsed header of a complete safetensors file, or ``ModelLoadError`` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path.name}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path.name}: the file is empty (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path.name}: not a valid .safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            raise ModelLoadError(f"{path.name}: not a valid .safetensors file (truncated or another format)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path.name}: not a valid .safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: not a valid .safetensors file (header is not a table)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise ModelLoadError(f"{path.name}: not a valid .safetensors file (bad entry {key!r})") from exc
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "has trailing bytes"
        raise ModelLoadError(f"{path.name}: the .safetensors file is {state} "
                             f"({size} bytes on disk, {8 + n + end} expected)")
    return header


def load_tensors(path: Path) -> dict:
    """All tensors of a checked file; what safetensors still refuses in a whole file (an unknown dtype, sizes that
    do not match the shapes) is a ``ModelLoadError`` too."""
    read_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:120]
        raise ModelLoadError(f"{Path(path).name}: the .safetensors file cannot be read ({first})") from exc


def check_safetensors_file(path: Path) -> None:
    read_header(path)


def read_metadata(path: Path) -> dict[str, str]:
    return dict(read_header(path).get("__metadata__") or {})


def save_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors (moved to the CPU, contiguous) and string metadata to ``path`` through a temporary file in the
    same folder and a rename, so a crash or a full disk never leaves a half-written file where a good one was."""
    path = Path(path)
    with replacing(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return path


def add_metadata(path: Path, extra: dict[str, str]) -> Path:
    """Add (or replace) string metadata in a finished file without loading its tensors: only the JSON header is
    rewritten (padded to 8 bytes, as safetensors writes it) and the data bytes are copied through, atomically."""
    path = Path(path)
    header = read_header(path)
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    header["__metadata__"] = {**(header.get("__metadata__") or {}), **{str(k): str(v) for k, v in extra.items()}}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with replacing(path) as tmp, path.open("rb") as src, tmp.open("wb") as dst:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        src.seek(8 + n)
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    return path
