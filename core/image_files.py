"""Reading a user's image file: one size-guarded opener and one faithful RGB conversion for every command and tab.

Why: ``Image.convert("RGB")`` clips 16-bit and 32-bit grayscale (PNG ``I;16``, TIFF ``I``) to pure white, and
``Image.open`` decodes whatever size a file declares; both surfaced as silent garbage or as library errors.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UserError

DEFAULT_MAX_PIXELS = 4096 * 4096
_WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 16/32-bit integer or float grayscale scaled to 8-bit ``L``; any other mode unchanged."""
    if image.mode not in _WIDE_GRAY:
        return image
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if image.mode.startswith("I;16"):
        full = 65535.0  # 16-bit samples, however dark the image
    elif image.mode == "F" and top <= 1.0:
        full = 1.0  # float images in 0..1
    elif top > 255.0:
        full = 65535.0  # 16-bit samples that PIL widened to 32-bit "I" (its mode for some 16-bit PNGs)
    else:
        full = 255.0
    return Image.fromarray(np.clip(values * (255.0 / full) + 0.5, 0, 255).astype(np.uint8), "L")


def rgb_image(image: Image.Image) -> Image.Image:
    """An RGB copy of any PIL image, 16-bit grayscale included (alpha, if any, dropped)."""
    return eight_bit(image).convert("RGB")


def shown_name(path: str | Path) -> str:
    """A file's name fit for a one-line message: as is, or quoted with escapes when it holds control characters."""
    name = Path(path).name
    return name if name.isprintable() else repr(name[:80])


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image in ``path`` (its own mode), or a one-line ``UserError`` naming the file and the reason.

    The declared size is checked against ``max_pixels`` before any pixel is decoded.
    """
    path, name = Path(path), shown_name(path)
    try:
        if not path.is_file():
            raise UserError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise UserError(f"{name}: not a readable image (empty file, 0 bytes)")
    except (OSError, ValueError) as exc:  # a name the OS refuses (too long, NUL byte)
        raise UserError(f"{name}: cannot open ({exc.__class__.__name__})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise UserError(f"{name}: too large, {w}x{h} is larger than the limit of {max_pixels} pixels")
                im.load()
                return im.copy()
        except UserError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserError(f"{name}: declares an enormous size (decompression bomb guard)") from None
        except Image.UnidentifiedImageError:
            raise UserError(f"{name}: not a readable image (unreadable: not an image file, or a format not "
                            "supported)") from None
        except Exception as exc:  # truncated or damaged data: PIL raises OSError, ValueError, SyntaxError, ...
            raise UserError(f"{name}: not a readable image (unreadable: damaged or truncated, "
                            f"{exc.__class__.__name__})") from None
