"""The judge's eye-labelled check set: objects cut from real generations (``bench/judge_check_set.py``), each
labelled by a person from contact sheets — a shape name, ``malformed`` (no shape the eye would name) or ``empty``,
plus colour and fill where an object is there. The judge is measured against it (``bench/judge_agreement.py``) and a
test keeps it there (``tests/test_judge_check_set.py``).

The *old* judge's shape verdict is the CNN's label alone (it always names a shape); the *new* judge's is
``malformed``/``empty`` when the fidelity check says so, else the CNN's label.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from PIL import Image

from microworld.judge import Judge, judge_images
from microworld.scenes import SHAPES

CLASSES = (*SHAPES, "malformed", "empty")


def load_set(folder: Path) -> tuple[list[dict], dict[str, dict]]:
    """The objects (``manifest.json``) and their labels by id (``labels.json``)."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["objects"]
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["labels"]
    return manifest, labels


def verdicts(folder: Path, manifest: list[dict], judge: Judge | None = None) -> dict[str, dict]:
    """Old and new shape verdicts, colour and fill of every object crop (judged as a whole region)."""
    images = [Image.open(folder / item["file"]).convert("RGB") for item in manifest]
    records = judge_images(images, judge=judge)
    out = {}
    for item, record in zip(manifest, records):
        new = record["named_shape"] if record["verdict"] == "ok" else record["verdict"]
        out[str(item["id"])] = {"old": record["shape"], "new": new, "color": record["color"], "fill": record["fill"],
                                "fidelity": record["fidelity"]}
    return out


def agreement(labels: dict[str, dict], judged: dict[str, dict], which: str) -> dict:
    """Shape-verdict agreement overall and per labelled class, the confusion table, and how often an object the eye
    calls malformed is given a shape (the dangerous error: it would count as 'right' when that shape was asked)."""
    pairs = [(labels[k]["shape"], judged[k][which]) for k in labels]
    confusion = Counter(pairs)
    per_class = {}
    for cls in CLASSES:
        n = sum(1 for truth, _ in pairs if truth == cls)
        if n:
            per_class[cls] = {"n": n, "agree": sum(1 for truth, got in pairs if truth == got == cls) / n}
    malformed = [got for truth, got in pairs if truth == "malformed"]
    named = [k for k in labels if labels[k]["shape"] in SHAPES]
    return {
        "n": len(pairs),
        "agreement": sum(truth == got for truth, got in pairs) / len(pairs),
        "per_class": per_class,
        "malformed_given_a_shape": (sum(got in SHAPES for got in malformed) / len(malformed)) if malformed else None,
        "colour_agreement_on_shapes": sum(labels[k]["color"] == judged[k]["color"] for k in named) / len(named),
        "confusion": {f"{truth}->{got}": n for (truth, got), n in sorted(confusion.items())},
    }
