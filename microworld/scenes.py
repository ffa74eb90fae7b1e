"""The micro world's procedural scenes: seeded, fast, with ground truth (labels, boxes, masks) and fixed-grammar captions.

Shapes are drawn from signed distance functions so edges are anti-aliased at any size; every random choice comes
from one ``numpy.random.Generator`` so a seed reproduces a scene exactly.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from core.errors import UserError

# The base set is what the base model sees; the novel set is held back for customization methods to teach.
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NOVEL_SHAPES: tuple[str, ...] = ("star", "heart", "cross", "ring")
BASE_FILLS: tuple[str, ...] = ("solid",)
NOVEL_FILLS: tuple[str, ...] = ("stripes", "dots", "checker")
SHAPES = BASE_SHAPES + NOVEL_SHAPES
FILLS = BASE_FILLS + NOVEL_FILLS

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
}
# How a fill reads in a caption; "solid" is the unmarked default.
FILL_ADJECTIVES: dict[str, str] = {"solid": "", "stripes": "striped", "dots": "dotted", "checker": "checkered"}

# 3x3 grid cell (row, col) of an object's centre -> caption phrase.
POSITION_PHRASES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
POSITIONS: tuple[str, ...] = tuple(POSITION_PHRASES.values())


def vocabulary() -> dict[str, dict[str, list[str]]]:
    """The base/novel split as plain lists (what ``microworld vocab`` prints)."""
    return {
        "base": {"shapes": list(BASE_SHAPES), "colors": list(COLORS), "fills": list(BASE_FILLS),
                 "backgrounds": list(BACKGROUNDS)},
        "novel": {"shapes": list(NOVEL_SHAPES), "fills": list(NOVEL_FILLS)},
    }


@dataclass(frozen=True)
class ObjectSpec:
    """One object to draw: centre and radius are fractions of the image side, so a spec renders at any size."""

    shape: str
    color: str
    fill: str = "solid"
    cx: float = 0.5
    cy: float = 0.5
    radius: float = 0.2


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    fill: str
    position: str  # caption phrase of the 3x3 cell holding the centre
    box: tuple[int, int, int, int]  # tight pixel box of the mask, x0, y0 inclusive, x1, y1 exclusive
    spec: ObjectSpec

    def box_normalized(self, size: int) -> tuple[float, float, float, float]:
        return tuple(round(v / size, 4) for v in self.box)  # type: ignore[return-value]


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    background: str
    objects: list[SceneObject]
    masks: np.ndarray  # (K, H, W) bool, one per object, after occlusion by later objects

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image)


@dataclass(frozen=True)
class SceneConfig:
    """What the random generator may draw; restrict a field to a single name to fix it."""

    size: int = 64
    shapes: tuple[str, ...] = BASE_SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    fills: tuple[str, ...] = BASE_FILLS
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    min_objects: int = 1
    max_objects: int = 3
    min_radius: float = 0.11
    max_radius: float = 0.2
    centered: bool = False  # single object in the middle (the "small world" curriculum)
    color_jitter: float = 0.0  # relative per-channel colour noise, for robustness of the judge

    def validate(self) -> "SceneConfig":
        checks = (("shape", self.shapes, SHAPES), ("color", self.colors, tuple(COLORS)),
                  ("fill", self.fills, FILLS), ("background", self.backgrounds, tuple(BACKGROUNDS)))
        for what, chosen, known in checks:
            if not chosen:
                raise UserError(f"no {what} to choose from")
            for name in chosen:
                if name not in known:
                    raise UserError(f"unknown {what} {name!r} (choose from {', '.join(known)})")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise UserError("objects per scene must be between 1 and 3")
        if self.size < 16:
            raise UserError("image size must be at least 16 pixels")
        if self.centered and self.max_objects != 1:
            raise UserError("centered scenes hold exactly one object")
        return self


# ---------------------------------------------------------------------------------------------- geometry


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points to a closed polygon, vectorised over points and edges."""
    vx, vy = verts[:, 0], verts[:, 1]
    ex, ey = np.roll(vx, -1) - vx, np.roll(vy, -1) - vy
    wx, wy = px[..., None] - vx, py[..., None] - vy
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.sqrt(np.min((wx - ex * t) ** 2 + (wy - ey * t) ** 2, axis=-1))
    above, below_next = py[..., None] >= vy, py[..., None] < np.roll(vy, -1)
    left = ex * wy > ey * wx
    crossings = ((above & below_next & left) | (~above & ~below_next & ~left)).sum(axis=-1)
    return np.where(crossings % 2 == 1, -dist, dist)


def _box_sdf(px: np.ndarray, py: np.ndarray, hx: float, hy: float) -> np.ndarray:
    dx, dy = np.abs(px) - hx, np.abs(py) - hy
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0)


def _regular_star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_T = np.linspace(0, 2 * np.pi, 48, endpoint=False)
_HEART = np.stack([16 * np.sin(_T) ** 3,
                   -(13 * np.cos(_T) - 5 * np.cos(2 * _T) - 2 * np.cos(3 * _T) - np.cos(4 * _T))], axis=1)
_HEART = (_HEART - (_HEART.max(0) + _HEART.min(0)) / 2) / 17.0  # centred, about unit half-extent


def shape_sdf(shape: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels to ``shape`` of half-extent ``r`` centred at the origin (y grows downwards)."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        return _box_sdf(px, py, 0.85 * r, 0.85 * r)
    if shape == "triangle":
        # Equilateral, pointing up, with its bounding box centred on the origin.
        h = 1.8 * r
        half = h / np.sqrt(3)
        verts = np.array([[0.0, -h / 2], [half, h / 2], [-half, h / 2]])
        return _polygon_sdf(px, py, verts)
    if shape == "star":
        return _polygon_sdf(px, py + 0.08 * r, _regular_star(5, r * 1.05, r * 0.45))
    if shape == "heart":
        return _polygon_sdf(px, py, _HEART * r)
    if shape == "cross":
        arm = 0.34 * r
        return np.minimum(_box_sdf(px, py, r, arm), _box_sdf(px, py, arm, r))
    if shape == "ring":
        return np.abs(np.hypot(px, py) - 0.72 * r) - 0.28 * r
    raise UserError(f"unknown shape {shape!r}")


def _fill_pattern(fill: str, px: np.ndarray, py: np.ndarray, size: int) -> np.ndarray:
    """1 where the object's own colour shows, 0 where its darker second tone shows."""
    if fill == "solid":
        return np.ones_like(px)
    period = max(4.0, size / 10.0)
    if fill == "stripes":
        return (((px + py) / period) % 1.0 < 0.5).astype(px.dtype)
    if fill == "dots":
        gx = (px / period) % 1.0 - 0.5
        gy = (py / period) % 1.0 - 0.5
        return (np.hypot(gx, gy) > 0.27).astype(px.dtype)
    if fill == "checker":
        return ((np.floor(px / period) + np.floor(py / period)) % 2 == 0).astype(px.dtype)
    raise UserError(f"unknown fill {fill!r}")


def position_of(cx: float, cy: float) -> str:
    """Caption phrase of the 3x3 cell that holds a (normalised) centre."""
    col = min(2, int(cx * 3))
    row = min(2, int(cy * 3))
    return POSITION_PHRASES[(row, col)]


def render(objects: Sequence[ObjectSpec], background: str = "gray", size: int = 64,
           rng: np.random.Generator | None = None, color_jitter: float = 0.0) -> Scene:
    """Draw explicit objects (later ones on top); ``rng`` is only needed for colour jitter."""
    if background not in BACKGROUNDS:
        raise UserError(f"unknown background {background!r} (choose from {', '.join(BACKGROUNDS)})")

    def jitter(rgb: tuple[int, int, int]) -> np.ndarray:
        colour = np.asarray(rgb, dtype=np.float32)
        if color_jitter > 0 and rng is not None:
            colour = colour * (1 + rng.uniform(-color_jitter, color_jitter, 3)).astype(np.float32)
        return np.clip(colour, 0, 255)

    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = jitter(BACKGROUNDS[background])
    masks = np.zeros((len(objects), size, size), dtype=bool)
    for index, spec in enumerate(objects):
        if spec.color not in COLORS:
            raise UserError(f"unknown color {spec.color!r} (choose from {', '.join(COLORS)})")
        r = spec.radius * size
        cx, cy = spec.cx * size, spec.cy * size
        x0, x1 = max(0, int(cx - 1.2 * r) - 1), min(size, int(np.ceil(cx + 1.2 * r)) + 2)
        y0, y1 = max(0, int(cy - 1.2 * r) - 1), min(size, int(np.ceil(cy + 1.2 * r)) + 2)
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        px, py = xs + 0.5 - cx, ys + 0.5 - cy
        coverage = np.clip(0.5 - shape_sdf(spec.shape, px, py, r), 0.0, 1.0)[..., None]
        main = jitter(COLORS[spec.color])
        tone = _fill_pattern(spec.fill, px, py, size)[..., None]
        ink = tone * main + (1 - tone) * (main * 0.35)
        patch = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = patch * (1 - coverage) + ink * coverage
        inside = coverage[..., 0] > 0.5
        masks[:index, y0:y1, x0:x1] &= ~inside
        masks[index, y0:y1, x0:x1] = inside
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    scene_objects = []
    for spec, mask in zip(objects, masks):
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
        scene_objects.append(SceneObject(spec.shape, spec.color, spec.fill, position_of(spec.cx, spec.cy), box, spec))
    return Scene(image, caption_for(scene_objects, background), background, scene_objects, masks)


# ---------------------------------------------------------------------------------------------- captions


def object_phrase(color: str, shape: str, fill: str = "solid", position: str | None = None) -> str:
    words = [w for w in (FILL_ADJECTIVES[fill], color, shape) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words] + ([position] if position else []))


def caption_for(objects: Sequence[SceneObject], background: str) -> str:
    """Fixed grammar: ``a red circle on the left and a blue square on the right, gray background``."""
    phrases = [object_phrase(o.color, o.shape, o.fill, o.position) for o in objects]
    if len(phrases) > 1:
        phrases = [", ".join(phrases[:-1]) + " and " + phrases[-1]]
    return f"{phrases[0]}, {background} background"


_ADJ_TO_FILL = {adj: fill for fill, adj in FILL_ADJECTIVES.items() if adj}
_OBJECT_RE = re.compile(
    r"an? (?:(?P<fill>{fills}) )?(?P<color>{colors}) (?P<shape>{shapes})(?: (?P<position>{positions}))?".format(
        fills="|".join(_ADJ_TO_FILL), colors="|".join(COLORS), shapes="|".join(SHAPES),
        positions="|".join(re.escape(p) for p in POSITIONS)))


def parse_caption(caption: str) -> tuple[list[dict[str, str | None]], str | None]:
    """Labels named by a caption of the fixed grammar: (objects as dicts, background or None)."""
    body, _, tail = caption.strip().rpartition(", ")
    match = re.fullmatch(r"(\w+) background", tail)
    background = match.group(1) if match and match.group(1) in BACKGROUNDS else None
    if background is None:
        body = caption.strip()
    objects = []
    for m in _OBJECT_RE.finditer(body):
        objects.append({"shape": m.group("shape"), "color": m.group("color"),
                        "fill": _ADJ_TO_FILL.get(m.group("fill") or "", "solid"), "position": m.group("position")})
    return objects, background


# ---------------------------------------------------------------------------------------------- random scenes


def _sample_specs(rng: np.random.Generator, config: SceneConfig) -> list[ObjectSpec]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    specs: list[ObjectSpec] = []
    used_cells: set[str] = set()
    for _ in range(count):
        for attempt in range(200):
            shape = str(rng.choice(config.shapes))
            color = str(rng.choice(config.colors))
            fill = str(rng.choice(config.fills))
            # Crowded scenes shrink their objects until they fit.
            shrink = 1.0 if count == 1 else (0.8 if count == 2 else 0.7) * (0.97 ** (attempt // 20))
            radius = float(rng.uniform(config.min_radius, config.max_radius)) * shrink
            if config.centered:
                cx = cy = 0.5
            else:
                margin = radius * 1.05
                cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, 2))
            cell = position_of(cx, cy)
            if cell in used_cells:
                continue
            if any(np.hypot(cx - s.cx, cy - s.cy) < radius + s.radius + 0.03 for s in specs):
                continue
            specs.append(ObjectSpec(shape, color, fill, cx, cy, radius))
            used_cells.add(cell)
            break
        else:
            break  # the scene is full; keep what fits
    # Reading order (top to bottom, left to right) makes captions deterministic in form.
    return sorted(specs, key=lambda s: (min(2, int(s.cy * 3)), s.cx))


def generate_scene(seed: int | Sequence[int] | np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """One random scene; the same seed and config always give the same pixels."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    specs = _sample_specs(rng, config)
    background = str(rng.choice(config.backgrounds))
    return render(specs, background, config.size, rng=rng, color_jitter=config.color_jitter)


def generate_scenes(n: int, seed: int = 0, config: SceneConfig = SceneConfig(), start: int = 0) -> Iterator[Scene]:
    """Scene ``i`` depends only on (seed, i), so any slice of a dataset can be regenerated alone."""
    config.validate()
    for index in range(start, start + n):
        yield generate_scene([seed, index], config)


# ---------------------------------------------------------------------------------------------- datasets

GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass
class DatasetSummary:
    folder: Path
    images: int
    ground_truth: Path
    config: dict = field(default_factory=dict)


def write_dataset(out: str | Path, n: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> DatasetSummary:
    """Images + same-name ``.txt`` captions (the studio's dataset layout) + one ground-truth JSON."""
    if n < 1:
        raise UserError("--n must be at least 1")
    config.validate()
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    records = []
    for index, scene in enumerate(generate_scenes(n, seed, config)):
        name = f"{index:0{width}d}"
        scene.to_pil().save(folder / f"{name}.png", optimize=False, compress_level=1)
        (folder / f"{name}.txt").write_text(scene.caption + "\n", encoding="utf-8")
        records.append({
            "file": f"{name}.png", "seed": [seed, index], "caption": scene.caption, "background": scene.background,
            "objects": [{"shape": o.shape, "color": o.color, "fill": o.fill, "position": o.position,
                         "box": list(o.box), "box_normalized": list(o.box_normalized(config.size)),
                         "center": [o.spec.cx, o.spec.cy], "radius": o.spec.radius} for o in scene.objects],
        })
    config_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    truth = folder / GROUND_TRUTH_FILE
    payload = {"format": "atelier-microworld-ground-truth", "version": 1, "seed": seed, "config": config_dict,
               "box_convention": "pixels x0,y0 inclusive, x1,y1 exclusive; masks regenerate from seed",
               "images": records}
    truth.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return DatasetSummary(folder, n, truth, config_dict)


def restrict(config: SceneConfig, *, shape: str | None = None, color: str | None = None, fill: str | None = None,
             objects: int | None = None) -> SceneConfig:
    """A config narrowed to one shape/colour/fill or an exact object count (the CLI's filters)."""
    changes: dict = {}
    if shape:
        changes["shapes"] = (shape,)
    if color:
        changes["colors"] = (color,)
    if fill:
        changes["fills"] = (fill,)
    if objects is not None:
        changes["min_objects"] = changes["max_objects"] = objects
    return replace(config, **changes).validate()
