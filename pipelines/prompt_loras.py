"""A1111's ``<lora:NAME:WEIGHT>`` prompt tags: adapters named in the prompt itself.

The tag stays in the prompt the image's parameters record (so PNG Info sends it back as typed), and is cut from the
text the encoder reads. NAME is an adapter of the Library: a file of the user's adapters folder by its name without
``.safetensors``, else a shipped example concept.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from adapters.library import EXAMPLE_CONCEPTS
from core.errors import UserError

LORA_TAG = re.compile(r"<lora:([^:<>]+?)(?::\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*)?>", re.IGNORECASE)


def strip_lora_tags(prompt: str) -> str:
    """The prompt as the text encoder reads it: tags removed, the spaces and commas they leave tidied."""
    text = LORA_TAG.sub("", prompt)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,")


def _adapter_files(folder: Path | None) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for root in (EXAMPLE_CONCEPTS, folder):  # the user's own file wins over an example of the same name
        if root is not None and Path(root).is_dir():
            files.update({p.stem: p for p in sorted(Path(root).glob("*.safetensors"))})
    return files


def lora_tags(prompt: str, folder: Path | None) -> tuple[tuple[str, float], ...]:
    """The (file, strength) of every ``<lora:NAME[:WEIGHT]>`` tag (weight 1 when left out), or a refusal that names
    the unknown adapter and the closest names there are."""
    found = LORA_TAG.findall(prompt or "")
    if not found:
        return ()
    files = _adapter_files(folder)
    by_lower = {name.lower(): path for name, path in files.items()}
    out = []
    for name, weight in found:
        name = name.strip()
        path = files.get(name) or by_lower.get(name.lower())
        if path is None:
            lower = {n.lower(): n for n in files}
            close = [lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=3)]
            hint = f" (did you mean {', '.join(close)}?)" if close else (
                f" (the Library has: {', '.join(sorted(files)[:8])})" if files else " (the Library is empty)")
            raise UserError(f"<lora:{name}>: no adapter of that name in the Library{hint}")
        out.append((str(path), float(weight) if weight else 1.0))
    return tuple(out)
