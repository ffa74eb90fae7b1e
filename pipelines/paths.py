"""Where the studio keeps its files: one data folder per user, overridable with ``ATELIER_HOME``."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "assets"
CLIP_TOKENIZER = ASSETS / "clip_tokenizer"


def data_home() -> Path:
    """The user's data folder (models built on first run, runs, outputs)."""
    env = os.environ.get("ATELIER_HOME")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return (base / "atelier").resolve()


def default_outputs() -> Path:
    return data_home() / "outputs"
