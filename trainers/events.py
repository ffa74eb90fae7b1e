"""The append-only event log of a run (``events.jsonl``): what the UI plots and tails, and what survives a crash.

Each event is one JSON line written with a single ``write`` on a file opened for appending, so concurrent readers
see whole lines; a torn last line (power cut) is skipped by the reader.
"""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from core.errors import UserError

EVENTS = "events.jsonl"


class EventLog:
    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, ensure_ascii=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                data, start = line.encode("utf-8"), os.fstat(fd).st_size
                if os.write(fd, data) != len(data):  # the disk filled up mid-line: take the torn line back
                    os.ftruncate(fd, start)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: one readable line, not a traceback
            raise UserError(f"could not write the event log {self.path}: {exc.strerror or exc}") from exc


def read_events(run_dir: Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # a line still being written
            try:
                yield json.loads(line)
            except ValueError:
                continue
