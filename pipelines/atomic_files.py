"""Replacing a file in one step, so a crash or a full disk never leaves a half-written file where a good one was.

Every save of the studio (adapters, images, run records) goes through :func:`replacing`: the new content is written to
a temporary file in the same folder (same filesystem, so the rename is atomic), which then takes the target's name.
"""
from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary file next to ``path``; when the block ends without an error the file becomes
    ``path``, otherwise it is removed and ``path`` is left as it was. The file gets the permissions an ordinary
    ``open`` would give (the umask applies; ``tempfile.mkstemp`` would make it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) re-create the file as private
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))
