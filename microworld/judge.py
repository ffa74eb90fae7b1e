"""The judge: a small CNN that reads shape, colour and fill of the object in an image or a crop.

It is trained on generator output only, so it measures diffusion samples against the world's ground truth (our
stand-in for CLIP/DINO scores). ``find_objects`` splits a generated scene into per-object crops by colour contrast
with its background, so multi-object samples can be judged object by object.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from core.errors import ModelLoadError, UserError
from core.image_files import rgb_image
from core.safetensors_files import load_tensors, read_metadata

from microworld.fidelity import Fit, cut_by_border, fit_object, name_shape, object_masks, position
from microworld.scenes import COLORS, FILLS, SHAPES

JUDGE_INPUT = 64
JUDGE_FORMAT = "atelier-microworld-judge"
JUDGE_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "judge" / "judge.safetensors"
HEADS = ("shape", "color", "fill")

ImageLike = Union[Image.Image, np.ndarray]
Box = Sequence[float]  # normalised x0, y0, x1, y1


@dataclass(frozen=True)
class JudgeVocab:
    shape: tuple[str, ...] = SHAPES
    color: tuple[str, ...] = tuple(COLORS)
    fill: tuple[str, ...] = FILLS

    def to_json(self) -> str:
        return json.dumps({head: list(getattr(self, head)) for head in HEADS})

    @classmethod
    def from_json(cls, text: str) -> "JudgeVocab":
        data = json.loads(text)
        return cls(**{head: tuple(data[head]) for head in HEADS})


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """Conv trunk, then average- and max-pooled features (an object may be small and anywhere) into three heads."""

    def __init__(self, vocab: JudgeVocab = JudgeVocab(), width: int = 32) -> None:
        super().__init__()
        w = width
        self.vocab = vocab
        self.trunk = nn.Sequential(_conv(3, w, 2), _conv(w, w, 1), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w, 1),
                                   _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 2))
        self.heads = nn.ModuleDict({head: nn.Linear(8 * w, len(getattr(vocab, head))) for head in HEADS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return {head: layer(pooled) for head, layer in self.heads.items()}


@dataclass
class Judge:
    net: JudgeNet
    vocab: JudgeVocab
    sha256: str = ""


def crop(image: ImageLike, box: Box | None = None) -> Image.Image:
    """The RGB region of ``image`` inside a normalised box (the whole image without one)."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    pil = rgb_image(pil)
    if box is None:
        return pil
    w, h = pil.size
    x0, y0, x1, y1 = box
    left, top = int(np.floor(x0 * w)), int(np.floor(y0 * h))
    right, bottom = max(left + 1, int(np.ceil(x1 * w))), max(top + 1, int(np.ceil(y1 * h)))
    return pil.crop((left, top, right, bottom))


def to_input(images: Sequence[ImageLike], boxes: Sequence[Box | None] | None = None) -> torch.Tensor:
    """Crop each image to its normalised box (if any), resize to the judge's input and normalise."""
    if boxes is not None and len(boxes) != len(images):
        raise UserError(f"{len(boxes)} boxes for {len(images)} images")
    batch = np.empty((len(images), JUDGE_INPUT, JUDGE_INPUT, 3), dtype=np.float32)
    for index, image in enumerate(images):
        pil = crop(image, boxes[index] if boxes is not None else None)
        if pil.size != (JUDGE_INPUT, JUDGE_INPUT):
            pil = pil.resize((JUDGE_INPUT, JUDGE_INPUT), Image.BILINEAR)
        batch[index] = np.asarray(pil, dtype=np.float32)
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2)
    return (tensor / 255.0 - 0.5) / 0.25


def save_judge(net: JudgeNet, path: str | Path, extra: dict[str, str] | None = None) -> str:
    """Write weights with vocab metadata; returns the file's sha256."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items() if "num_batches" not in k}
    metadata = {"format": JUDGE_FORMAT, "version": str(JUDGE_VERSION), "vocab": net.vocab.to_json(),
                "input_size": str(JUDGE_INPUT), "width": str(net.trunk[0][0].out_channels), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_CACHE: dict[str, Judge] = {}


def load_judge(path: str | Path | None = None) -> Judge:
    """The judge from a weights file (default: the shipped one), cached per path."""
    file = Path(path) if path else DEFAULT_WEIGHTS
    key = str(file.resolve())
    if key in _CACHE:
        return _CACHE[key]
    if not file.is_file():
        raise ModelLoadError(f"judge weights not found: {file}")
    metadata = read_metadata(file)  # empty, truncated, renamed files: one line naming what is wrong
    if metadata.get("format") != JUDGE_FORMAT:
        raise ModelLoadError(f"{file.name} is not a micro world judge (format {metadata.get('format')!r})")
    state = load_tensors(file)
    try:
        vocab = JudgeVocab.from_json(metadata["vocab"])
        net = JudgeNet(vocab, width=int(metadata.get("width", 32)))
        net.load_state_dict(state, strict=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a judge file with damaged metadata or shapes
        raise ModelLoadError(f"{file.name}: damaged judge weights ({str(exc).splitlines()[0][:120]})") from None
    net.eval()
    judge = Judge(net, vocab, hashlib.sha256(file.read_bytes()).hexdigest())
    _CACHE[key] = judge
    return judge


@torch.no_grad()
def judge_probabilities(judge: Judge, images: Sequence[ImageLike],
                        boxes: Sequence[Box | None] | None = None) -> dict[str, torch.Tensor]:
    """Per-head class probabilities, (N, classes) each, in the judge's vocab order."""
    x = to_input(images, boxes)
    out: dict[str, list[torch.Tensor]] = {head: [] for head in HEADS}
    for start in range(0, len(x), 256):
        logits = judge.net(x[start:start + 256])
        for head in HEADS:
            out[head].append(logits[head].softmax(dim=1))
    return {head: torch.cat(parts) if parts else torch.empty(0) for head, parts in out.items()}


EMPTY_BELOW = 32  # foreground pixels of the object: fewer, and the region holds nothing to name (a speck)


def region_fits(image: ImageLike, box: Box | None = None) -> tuple[str, np.ndarray | None, list[Fit]]:
    """What :func:`shape_verdict` decides on: the region's state — ``no background`` (noise, a texture), ``empty``
    (a speck at most), ``cut`` (the object runs into the image's edge) or ``whole`` — the object's mask, and every
    shape's fit to it (none unless cut or whole)."""
    masks = object_masks(np.asarray(crop(image)), tuple(box) if box is not None else None)
    if masks is None:
        return "no background", None, []
    if masks.tight.sum() < EMPTY_BELOW:
        return "empty", masks.tight, []
    fits = [fit_object(masks, shape) for shape in SHAPES]
    return ("cut" if cut_by_border(masks.tight) else "whole"), masks.tight, fits


def shape_verdict(image: ImageLike, box: Box | None = None) -> dict:
    """The CNN-free check of one judged region (see :mod:`microworld.fidelity`).

    The object is the largest foreground component centred in ``box`` (the whole image without one); every shape is
    fitted to it, and the best-fitting one at or above its threshold is the shape the new judge names. ``verdict``:
    ``ok``, ``malformed`` (no shape fits well enough, the object runs into the image's edge, or there is no
    background around it, as for noise) or ``empty``; ``named_shape`` (None unless ok); ``fidelity`` (the named
    shape's IoU, else the best fit's); ``position`` (the place of the object in the whole image, None when empty)."""
    state, obj, fits = region_fits(image, box)
    if state in ("no background", "empty"):
        return {"verdict": "malformed" if state == "no background" else "empty", "named_shape": None,
                "fidelity": 0.0, "position": None}
    named = name_shape(fits) if state == "whole" else None
    if named is not None:
        # a well-formed object is placed by its fitted centre, as the generator places it
        return {"verdict": "ok", "named_shape": named.shape, "fidelity": named.iou,
                "position": position(obj, (named.cx, named.cy))}
    return {"verdict": "malformed", "named_shape": None, "fidelity": max(fit.iou for fit in fits),
            "position": position(obj)}


def is_right(record: dict, shape: str, color: str, position: str | None = None) -> bool:
    """The new judge's "right": a well-formed object of the asked shape (the shape it names) and colour (and, given one, in the named
    place). The old judge's "right" is ``record["shape"] == shape and record["color"] == color``."""
    return (record.get("verdict") == "ok" and record.get("named_shape") == shape and record["color"] == color
            and (position is None or record.get("position") == position))


def judge_images(images: Sequence[ImageLike], boxes: Sequence[Box | None] | None = None,
                 judge: Judge | None = None) -> list[dict]:
    """Top-1 ``shape``, ``color``, ``fill`` with ``*_prob`` and the full distributions, one dict per image, plus
    the CNN-free check of the named shape: ``verdict``, ``fidelity`` and ``position`` (:func:`shape_verdict`).

    ``objects_found`` counts blobs standing out from the region's border colour: 0 means the region looks empty.
    The CNN's labels are kept as they always were (old verdicts stay reproducible); a ``malformed`` or ``empty``
    verdict says that its shape label is not to be believed.
    """
    judge = judge or load_judge()
    probs = judge_probabilities(judge, images, boxes)
    results = []
    for index in range(len(images)):
        region = crop(images[index], boxes[index] if boxes is not None else None)
        record: dict = {"objects_found": len(find_objects(region))}
        for head in HEADS:
            p = probs[head][index]
            best = int(p.argmax())
            record[head] = getattr(judge.vocab, head)[best]
            record[f"{head}_prob"] = round(float(p[best]), 4)
        record["probabilities"] = {head: {name: round(float(v), 4) for name, v in
                                          zip(getattr(judge.vocab, head), probs[head][index])} for head in HEADS}
        record.update(shape_verdict(images[index], boxes[index] if boxes is not None else None))
        results.append(record)
    return results


def find_objects(image: ImageLike, threshold: float = 60.0, min_pixels: int = 12) -> list[tuple[float, ...]]:
    """Normalised boxes of blobs that differ from the background (the median border colour), largest first."""
    from scipy import ndimage  # scipy (~0.3 s) only for finding objects, not for loading or running the judge

    pixels = np.asarray(rgb_image(image) if isinstance(image, Image.Image) else image, dtype=np.float32)
    h, w = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(pixels - background, axis=-1) > threshold
    foreground = ndimage.binary_opening(foreground)
    labels, count = ndimage.label(foreground)
    found = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        area = int((labels[region] == index).sum())
        if area < min_pixels:
            continue
        ys, xs = region
        found.append((area, (xs.start / w, ys.start / h, xs.stop / w, ys.stop / h)))
    return [box for _, box in sorted(found, key=lambda item: -item[0])]


def pad_box(box: Box, margin: float = 0.15) -> tuple[float, float, float, float]:
    """A box grown by ``margin`` of its size on each side (crops like the judge saw in training), clamped."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(1.0, x1 + dx), min(1.0, y1 + dy)


def judge_scene(image: ImageLike, judge: Judge | None = None) -> list[dict]:
    """Every object found in a scene, judged on its own crop; each result carries its ``box``."""
    boxes = [pad_box(b) for b in find_objects(image)]
    if not boxes:
        return []
    results = judge_images([image] * len(boxes), boxes, judge)
    for result, box in zip(results, boxes):
        result["box"] = [round(v, 4) for v in box]
    return results
