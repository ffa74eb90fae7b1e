"""Generation parameters in PNG files, in the A1111 ``parameters`` text-chunk convention.

Why that convention: A1111, ComfyUI's loaders, Civitai and most image browsers read it, so a picture made here can
be dropped into those tools and its settings come back.

    <prompt>
    Negative prompt: <negative>
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123abcd, Model: name
"""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core.atomic_files import replacing

NEGATIVE = "Negative prompt:"
_PAIR = re.compile(r'\s*([\w \-/+]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _format_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text or "\n" in text) else text


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {_format_value(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Inverse of :func:`format_parameters`: ``{"prompt", "negative_prompt", "settings": {key: str}}``."""
    lines = text.strip("\n").split("\n")
    settings: dict[str, str] = {}
    if lines and _PAIR.match(lines[-1]) and len(_PAIR.findall(lines[-1])) >= 2:
        for key, value in _PAIR.findall(lines.pop()):
            value = value.strip()
            settings[key.strip()] = json.loads(value) if value.startswith('"') else value
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(NEGATIVE):
            target = negative_lines
            line = line[len(NEGATIVE):].lstrip()
        target.append(line)
    return {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines), "settings": settings}


def save_png_with_parameters(image: Image.Image, path: Path, parameters: str,
                             sidecar: dict[str, Any] | None = None) -> Path:
    """Write ``image`` with a ``parameters`` text chunk, and a same-name ``.json`` sidecar when given. Both are written
    to temporaries first and renamed only when both are whole, so a failed save (disk full) keeps the old pair."""
    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", parameters)
    with ExitStack() as stack:
        png_tmp = stack.enter_context(replacing(path))
        if sidecar is not None:
            json_tmp = stack.enter_context(replacing(path.with_suffix(".json")))
            json_tmp.write_bytes(json.dumps(sidecar, indent=2, ensure_ascii=False).encode("utf-8"))
        with open(png_tmp, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: Path) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")


def generation_fields(parameters: str) -> dict[str, Any]:
    """The Generate form's fields a ``parameters`` text sets (A1111's PNG Info → *Send to txt2img*): prompt, negative
    prompt, steps, CFG scale, seed, size and sampler; a value that is missing or unreadable is left out."""
    parsed = parse_parameters(parameters)
    settings = parsed["settings"]
    fields: dict[str, Any] = {"prompt": parsed["prompt"], "negative_prompt": parsed["negative_prompt"]}
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int)):
        try:
            fields[name] = kind(settings[key])
        except (KeyError, ValueError):
            pass
    size = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(settings.get("Size", "")))
    if size:
        fields["width"], fields["height"] = int(size[1]), int(size[2])
    if settings.get("Sampler"):
        fields["sampler"] = str(settings["Sampler"])
    return fields
