"""Replacing a file in one step, so a crash or a full disk never leaves a half-written file where a good one was.

Every save of the studio (adapters, images, run records) goes through :func:`replacing`: the new content is written to
a temporary file in the same folder (same filesystem, so the rename is atomic), flushed to the disk, and then takes
the target's name. A save that fails because the disk is full (or the file too large, or the folder not writable)
raises a one-line :class:`~core.errors.UserError` naming the file and the reason.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import UserError

# safetensors writes from Rust and reports an I/O failure as SafetensorError("... (os error 28)").
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_errno(exc: BaseException) -> int | None:
    """The OS error number behind a failed write (ENOSPC, EFBIG, EACCES, ...), or None for other failures."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        found = _RUST_OS_ERROR.search(str(exc))
        return int(found.group(1)) if found else None
    return None


def save_failed(what: str, exc: BaseException) -> UserError | None:
    """A readable error for a save that failed in the file system (``could not save X: No space left on device``),
    or None when ``exc`` is not a file-system failure (a bug, which should surface as itself)."""
    code = write_errno(exc)
    if code is None:
        return None
    return UserError(f"could not save {what}: {os.strerror(code)}")


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk, so a power cut after the rename cannot leave an empty file in its place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a new empty temporary file next to ``path``; when the block ends without an error the file becomes
    ``path``, otherwise it is removed and ``path`` is left as it was. The file gets the permissions an ordinary
    ``open`` would give (the umask applies; ``tempfile.mkstemp`` would make it private)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"could not save {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) re-create the file as private
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = save_failed(str(path), exc)
        if error is not None:
            raise error from exc
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))
