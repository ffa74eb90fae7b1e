"""The judge's eye-labelled check set: objects cut from real generations (``bench/judge_check_set.py``), each
labelled by a person from contact sheets — a shape name, ``malformed`` (no shape the eye would name) or ``empty``,
plus colour and fill where an object is there. The judge is measured against it (``bench/judge_agreement.py``) and a
test keeps it there (``tests/test_judge_check_set.py``).

The *old* judge's shape verdict is the CNN's label alone (it always names a shape); the *new* judge's is
``malformed``/``empty`` when the fidelity check says so, else the CNN's label.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from microworld.fidelity import CONVEX, Fit, fit_object, name_shape, object_masks
from microworld.judge import Judge, judge_images, region_fits
from microworld.scenes import FILLS, SHAPES, SceneConfig, generate_scenes

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
    named = [k for k in labels if labels[k]["shape"] in SHAPES and "color" in labels[k]]
    return {
        "n": len(pairs),
        "agreement": sum(truth == got for truth, got in pairs) / len(pairs),
        "per_class": per_class,
        "malformed_given_a_shape": (sum(got in SHAPES for got in malformed) / len(malformed)) if malformed else None,
        "colour_agreement_on_shapes": (sum(labels[k]["color"] == judged[k]["color"] for k in named) / len(named))
        if named else None,
        "confusion": {f"{truth}->{got}": n for (truth, got), n in sorted(confusion.items())},
    }


def load_second_pass(folder: Path) -> dict[str, dict] | None:
    """The second, blind labelling of the shapes (``labels_second_pass.json``), if the set has one."""
    path = folder / "labels_second_pass.json"
    return json.loads(path.read_text(encoding="utf-8"))["labels"] if path.is_file() else None


def consensus(first: dict[str, dict], second: dict[str, dict]) -> dict[str, dict]:
    """The objects both labellings give the same shape (the first pass's labels, colour included)."""
    return {k: v for k, v in first.items() if k in second and second[k]["shape"] == v["shape"]}


def eye_against_eye(first: dict[str, dict], second: dict[str, dict]) -> dict:
    """How well the eye agrees with itself: the second labelling read as a 'judge' of the first."""
    shapes_only = {k: {"shape": v["shape"]} for k, v in first.items() if k in second}  # no colour: none compared
    return agreement(shapes_only, {k: {"second": v["shape"]} for k, v in second.items()}, "second")


def object_fits(folder: Path, manifest: list[dict]) -> dict[str, str | list[Fit]]:
    """Per object: ``"malformed"``/``"empty"`` where no shape can be named (no background, a speck, cut by the
    region's edge), else every shape's fit (:func:`microworld.judge.region_fits`): what the thresholds are fitted on."""
    out: dict[str, str | list[Fit]] = {}
    for item in manifest:
        state, _, fits = region_fits(Image.open(folder / item["file"]).convert("RGB"))
        out[str(item["id"])] = fits if state == "whole" else ("empty" if state == "empty" else "malformed")
    return out


START = 0.85  # every threshold's start
START_DEVIATION = 0.25  # every deviation limit's start (a quarter of the radius: a clear bump)
SOLIDITY_GRID = tuple(round(v, 2) for v in np.arange(0.80, 0.951, 0.01))


def generator_floors(count: int = 300, seed: int = 41) -> dict[str, dict[str, float]]:
    """Per shape, the lowest fidelity, the largest deviation and the lowest solidity of the generator's own objects
    (every fill, the smallest sizes the base model is trained on): limits beyond them would call the generator's
    shapes malformed."""
    config = SceneConfig(shapes=SHAPES, fills=FILLS, max_objects=1, min_radius=0.11, max_radius=0.3)
    floors: dict[str, dict[str, float]] = {"fidelity": {}, "deviation": {}, "solidity": {}}
    for scene in generate_scenes(count, seed, config):
        shape = scene.objects[0].shape
        fit = fit_object(object_masks(np.asarray(scene.image)), shape)
        floors["fidelity"][shape] = min(floors["fidelity"].get(shape, 1.0), fit.iou)
        floors["deviation"][shape] = max(floors["deviation"].get(shape, 0.0), fit.deviation)
        floors["solidity"][shape] = min(floors["solidity"].get(shape, 1.0), fit.solidity)
    return floors


def fit_thresholds(labels: dict[str, dict], fits: dict[str, str | list[Fit]], floors: dict[str, dict[str, float]],
                   rounds: int = 4) -> dict:
    """Thresholds, preferences, deviation limits and the convex shapes' least solidity that make the new judge agree
    best with ``labels`` (agreement minus the share of malformed objects given a shape), by coordinate search from a
    neutral start (every threshold :data:`START`, every deviation limit :data:`START_DEVIATION`, no preference, no
    solidity bar; the search does not depend on what is shipped). Each threshold stays at least 0.01 below its
    shape's generator ``floors``, each deviation limit 0.02 above, the solidity bar 0.01 below the generator's convex
    objects. Run on half of the check set, it leaves the other half to measure them on. Shapes too rare in
    ``labels`` get the strictest limits their floors allow."""
    def objective(params: dict) -> float:
        got = {}
        for k in labels:
            named = None if isinstance(fits[k], str) else name_shape(fits[k], **params)
            got[k] = fits[k] if isinstance(fits[k], str) else (named.shape if named else "malformed")
        agree = sum(got[k] == labels[k]["shape"] for k in labels) / len(labels)
        malformed = [k for k in labels if labels[k]["shape"] == "malformed"]
        wrong = sum(got[k] in SHAPES for k in malformed) / max(1, len(malformed))
        return agree - wrong

    ceiling = {shape: np.floor(100 * floors["fidelity"][shape] - 1) / 100 for shape in SHAPES}
    least = {shape: np.ceil(100 * floors["deviation"][shape] + 2) / 100 for shape in SHAPES}
    solid_ceiling = np.floor(100 * min(floors["solidity"][shape] for shape in CONVEX) - 1) / 100
    fitted = [shape for shape in SHAPES if sum(label["shape"] == shape for label in labels.values()) >= 3]
    params = {"thresholds": {s: float(ceiling[s]) if s not in fitted else min(START, ceiling[s]) for s in SHAPES},
              "preference": {s: 0.0 for s in SHAPES},
              "deviations": {s: float(least[s]) if s not in fitted else max(START_DEVIATION, least[s]) for s in SHAPES},
              "min_solidity": 0.0}
    grids = {"thresholds": lambda s: np.arange(0.70, ceiling[s] + 0.001, 0.01),
             "preference": lambda s: np.arange(-0.08, 0.081, 0.005),
             "deviations": lambda s: np.arange(least[s], 0.601, 0.01)}

    def best(values, trial, current):  # the best value; of equals, the one nearest the current
        return max((round(float(v), 3) for v in values), key=lambda v: (objective(trial(v)), -abs(v - current)))

    def search(min_solidity: float) -> dict:
        found = copy.deepcopy(params) | {"min_solidity": min_solidity}
        for _ in range(rounds):
            for shape in fitted:
                for table, grid in grids.items():
                    if table == "preference" and shape == "circle":
                        continue  # the reference the others are preferred against
                    current = found[table][shape]
                    found[table][shape] = max(
                        (round(float(v), 3) for v in grid(shape)),
                        key=lambda v: (objective(found | {table: found[table] | {shape: v}}), -abs(v - current)))
        return found

    # the solidity bar moves the best thresholds of every convex shape at once: each is searched for on its own
    params = max((search(v) for v in (0.0, *(v for v in SOLIDITY_GRID if v <= solid_ceiling))), key=objective)
    return {"thresholds": {s: round(params["thresholds"][s], 2) for s in SHAPES},
            "preference": {s: params["preference"][s] for s in fitted if params["preference"][s]},
            "deviations": {s: round(params["deviations"][s], 2) for s in SHAPES},
            "min_solidity": params["min_solidity"], "generator_floors": floors, "shapes_fitted": fitted}
