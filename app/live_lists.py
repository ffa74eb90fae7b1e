"""Lists that follow the disk: a tab's adapter (or run, key, model) list updates when a file appears, changes or goes,
without a page reload.

A timer per page compares a cheap signature of the folders (names, sizes, modification times) with the last one it
saw and calls the tab's own refresh only when it changed, so an idle page costs a few ``stat`` calls per tick.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import gradio as gr

TICK_SECONDS = 3.0


def folder_signature(folders: Sequence[Path]) -> list:
    """What changes when a file of these folders (not their subfolders' contents) is added, removed or rewritten."""
    found = []
    for folder in folders:
        try:
            entries = sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []
        except OSError:
            continue
        for path in entries:
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append([str(path), stat.st_size, stat.st_mtime_ns])
    return found


def keep_fresh(folders: Callable[[], Sequence[Path]], refresh: Callable, inputs: list, outputs: list) -> None:
    """Run ``refresh(*inputs)`` into ``outputs`` whenever ``folders()`` change (call inside the page's Blocks)."""
    timer = gr.Timer(TICK_SECONDS)
    seen = gr.State(None)

    def tick(signature, *values):
        now = folder_signature(folders())
        if now == signature:
            return (gr.skip(),) * (len(outputs) + 1)
        result = refresh(*values)
        return (now, *(result if isinstance(result, (tuple, list)) else (result,)))

    timer.tick(tick, [seen, *inputs], [seen, *outputs], queue=False, show_progress="hidden")
