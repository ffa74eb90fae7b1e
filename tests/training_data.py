"""Small datasets the training tests draw themselves (no files are shipped or downloaded)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_dataset(folder: Path, n: int = 6, size: tuple[int, int] = (32, 32), caption: str = "a red circle",
                 shape: str = "circle") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (128, 128, 128))
        d = ImageDraw.Draw(im)
        x, y = 4 + (i * 3) % 8, 4 + (i * 5) % 8
        box = (x, y, x + size[0] // 2, y + size[1] // 2)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=(220, 30, 30))
        im.save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(caption)
    return folder
