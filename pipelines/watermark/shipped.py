"""Where the studio's own watermark extractor lives (trained by ``trainers.watermark_extractor``)."""
from __future__ import annotations

from pathlib import Path

from core.errors import ModelLoadError

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "watermark"
EXTRACTOR_FILE = "extractor-v1.safetensors"


def default_extractor_path() -> Path:
    path = ASSETS / EXTRACTOR_FILE
    if not path.is_file():
        raise ModelLoadError(f"the shipped watermark extractor {path} is missing; reinstall or pass --extractor")
    return path
