"""Where the studio keeps its files: one data folder per user, overridable with ``ATELIER_HOME``."""
from __future__ import annotations

import os
import re
import unicodedata
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


MAX_NAME = 120  # characters of a sanitised file name


def safe_name(name: str, default: str = "file") -> str:
    """A file name with no folders, no leading dots and only portable characters (uploads, run names)."""
    base = Path(str(name).replace("\\", "/")).name
    base = unicodedata.normalize("NFKC", base)
    base = re.sub(r"[^\w.\- ]+", "_", base, flags=re.UNICODE).strip(" .")
    if len(base) > MAX_NAME:  # shortened before the suffix, so an image stays an image
        stem, dot, suffix = base.rpartition(".")
        keep = f".{suffix}" if dot and stem and len(suffix) <= 10 else ""
        base = base[:MAX_NAME - len(keep)].rstrip(" .") + keep
    return base or default
