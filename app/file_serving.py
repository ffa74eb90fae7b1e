"""What the page may serve beyond the outputs folder: files a tab adds while the studio runs (a run's samples, an
exported adapter). Its own module so the tabs need not import the studio that builds them."""
from __future__ import annotations

from pathlib import Path

import gradio as gr


def serve_files(demo: gr.Blocks, *paths: Path) -> None:
    """Let the page show ``paths`` (files or folders outside the outputs folder, e.g. a run's samples or an exported
    adapter): Gradio copies only allowed files into its cache and serves nothing else, so the runs and adapters
    folders are not served as a whole. Takes effect at once (Gradio reads the list on every request)."""
    allowed = getattr(demo, "allowed_paths", None)
    if allowed is None:
        return
    for path in paths:
        text = str(Path(path).resolve())
        if text not in allowed:
            allowed.append(text)
