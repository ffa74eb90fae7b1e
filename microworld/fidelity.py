"""How much a drawn object looks like the shape it is called: a check that does not come from the judge's CNN.

The CNN always names *some* shape, even for noise or a smear. Here the object's masks (:func:`object_masks`: pixels
standing out from the background, and the same cut at a share of the object's own contrast so a blurred edge does
not round its corners; the better fit counts) are compared with the generator's own rendering of every shape
(:func:`microworld.scenes.shape_sdf`), searched over position, scale and rotation (a heart only near upright, as the
generator draws it); a triangle's corners may then move freely (a wedge is a triangle to the eye), a square's
corners may be rounded, and a ring is a closed band: an object with a real hole whose outline is round. The best
intersection-over-union is the object's *fidelity* to that shape. IoU averages over the whole outline, the eye does
not: a bump, a dent or an oval's overhang is seen even when the IoU is high, so each fit also records its widest
stray part (*deviation*) and the object's *solidity*. :func:`name_shape` names the best-fitting shape if its
fidelity reaches the shape's threshold and neither of the others rules it out, else the object is ``malformed``: a
shape the judge will not name. The object's place among the generator's nine (:func:`microworld.scenes.position_of`)
lets a caption's positions be checked too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from microworld.scenes import _HEART, SHAPES, _regular_star, position_of

# Rotational symmetry of each shape (degrees after which it looks the same); 0: rotation changes nothing.
SYMMETRY = {"circle": 0, "ring": 0, "square": 90, "cross": 90, "triangle": 120, "star": 72, "heart": 360}
# Rotations a shape is searched over, where not every one: the generator draws hearts upright, and a heart turned
# upside down is a wedge the eye reads as a triangle, not a heart.
ROTATIONS: dict[str, tuple[float, float]] = {"heart": (-20.0, 20.0)}
MALFORMED_BELOW = 0.80  # a shape without a threshold of its own
# Per shape: the fidelity a drawn shape the eye names reaches, and a small preference between shapes whose fits come
# close (a rounded square fits a circle nearly as well as a square). Circle, square, triangle and ring were fitted on
# the even-numbered half of the eye-labelled check set by ``python bench/judge_agreement.py --fit``
# (bench/results/judge_check_set, docs/judge_check_set.md; agreement is reported on the odd half too), each kept at
# least 0.01 below the lowest fidelity of the generator's own objects of its shape; the check set has too few hearts,
# stars and crosses to fit theirs, which sit at that ceiling. So every generator object of every shape, fill and
# background is well formed (tests/test_judge.py).
THRESHOLDS: dict[str, float] = {"circle": 0.88, "square": 0.83, "triangle": 0.85, "ring": 0.84,
                                "heart": 0.89, "star": 0.79, "cross": 0.87}
PREFERENCE: dict[str, float] = {"square": -0.01, "triangle": -0.01}
# Per shape: how far (a share of the fitted radius) the widest stray part of a named object may reach (Fit.deviation),
# and how solid a convex shape must be (Fit.solidity); fitted with the thresholds, each deviation limit at least 0.02
# above the largest of the generator's own objects.
DEVIATIONS: dict[str, float] = {"circle": 0.20, "square": 0.28, "triangle": 0.27, "ring": 0.33,
                                "heart": 0.17, "star": 0.21, "cross": 0.25}
CONVEX = ("circle", "square", "triangle", "ring")  # a ring's outline
MIN_SOLIDITY = 0.85
# RGB distance from the background that counts as foreground: a fill's dark tone (0.35 of the colour) on the black
# background is 40-60 away, so lower than find_objects' 60, which only has to find an object's bright part.
CONTRAST = 30.0
BORDER_LIMIT = 0.25  # a region whose border is more foreground than this has no background: not an object
UPSAMPLE = 2  # masks are compared at twice the image's resolution: edges of small objects matter less
FRAGMENT_SHARE = 0.2  # components at least this share of the largest one belong to the object
EDGE_LEVEL = 0.35  # the object's edge: this share of its strong (90th percentile) contrast with the background
SMALL_HOLE = 0.06  # holes smaller than this share of the object are a fill's dark tone; larger ones are real
FRAME_SHARE = 0.2  # a ring of pixels belongs to a frame when this share of it stands out (most of one side)
FRAME_DEPTH = 5  # the thickest frame along the border (pixels) that is painted over before looking for objects


@dataclass(frozen=True)
class Fit:
    shape: str
    iou: float
    cx: float  # normalised to the mask's image
    cy: float
    radius: float
    angle: float  # degrees
    # the thickest stretch where object and fitted shape differ (a bump, a dent, an oval's overhang), as a share of
    # the fitted radius: IoU spreads a boundary that is a little off everywhere and one bump alike; the eye does not
    deviation: float = 0.0
    # the object's area over its convex hull's (its outline's, for a ring): a dent or a lobe lowers it, which no
    # convex shape has
    solidity: float = 1.0


def foreground(image: np.ndarray, contrast: float = CONTRAST) -> np.ndarray:
    """Every pixel far from the image border's median colour, closed (a fill's dark second tone and anti-aliased
    edges stay inside)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    mask = np.linalg.norm(pixels - _background(pixels), axis=-1) > contrast
    return ndimage.binary_closing(mask, iterations=1) | mask


def select_object(mask: np.ndarray, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The object a region holds: of the foreground's components whose centre lies in ``box`` (normalised; the
    whole image without one), the largest and the fragments comparable to it. Looking at the whole image, not the
    cut region, keeps an object that reaches past its box whole."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    h, w = mask.shape
    centres = ndimage.center_of_mass(mask, labels, range(1, count + 1))
    areas = ndimage.sum(mask, labels, index=range(1, count + 1))
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, 1.0, 1.0)
    inside = [i for i, (cy, cx) in enumerate(centres) if x0 <= (cx + 0.5) / w <= x1 and y0 <= (cy + 0.5) / h <= y1]
    if not inside:
        return np.zeros_like(mask)
    largest = max(areas[i] for i in inside)
    return np.isin(labels, [i + 1 for i in inside if areas[i] >= FRAGMENT_SHARE * largest])


def cut_by_border(mask: np.ndarray, tolerance: int = 2) -> bool:
    """The object runs into the image's edge (more than ``tolerance`` border pixels): only a part of it is seen.
    The generator keeps every object inside the image. A thin stroke reaching the edge (a stray line, a neighbour's
    tail) does not cut the object: the mask is opened first."""
    body = ndimage.binary_opening(mask, iterations=1)
    ring = np.concatenate([body[0], body[-1], body[:, 0], body[:, -1]])
    return int(ring.sum()) > tolerance


def has_background(mask: np.ndarray) -> bool:
    """Most of the image's border is background (noise or a texture is not an object on a background)."""
    ring = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    return float(ring.mean()) <= BORDER_LIMIT


@dataclass(frozen=True)
class ObjectMasks:
    """Two readings of one object's edge. ``loose``: every pixel that stands out from the background (contrast
    :data:`CONTRAST`), which keeps a small object's textured fill whole but widens a blurred edge and rounds corners;
    ``tight``: the edge where the contrast reaches :data:`EDGE_LEVEL` of the object's own, as the eye places a
    blurred edge. An object's fidelity to a shape is the better of its two fits (:func:`fit_object`)."""
    tight: np.ndarray
    loose: np.ndarray


def object_masks(image: np.ndarray, box: tuple[float, float, float, float] | None = None) -> ObjectMasks | None:
    """The masks of the object a region holds (:func:`select_object`), or None where the region has no background
    around it (noise, a texture). In the tight one the small holes a fill's dark tone leaves are closed (a ring's
    hole is larger and stays)."""
    pixels = without_frame(np.asarray(image, dtype=np.float32)[..., :3])
    loose = foreground(pixels)
    if not has_background(loose):
        return None
    found = select_object(loose, box)
    if not found.any():
        return ObjectMasks(found, found)
    contrast = np.linalg.norm(pixels - _background(pixels), axis=-1)
    level = max(CONTRAST, EDGE_LEVEL * float(np.percentile(contrast[found], 90)))
    # inside the loose object (a pixel away from its edge) everything is object: a fill's dark stripes cut notches
    tight = ((contrast > level) & ndimage.binary_dilation(found, iterations=1)) | ndimage.binary_erosion(found)
    tight = select_object(ndimage.binary_closing(tight, iterations=1) | tight, box)
    holes, count = ndimage.label(ndimage.binary_fill_holes(tight) & ~tight)
    if count:
        sizes = ndimage.sum(holes > 0, holes, range(1, count + 1))
        area = tight.sum() + sizes.sum()
        tight |= np.isin(holes, [i + 1 for i, size in enumerate(sizes) if size < SMALL_HOLE * area])
    return ObjectMasks(_without_strokes(tight), _without_strokes(found))


def _without_strokes(mask: np.ndarray) -> np.ndarray:
    """The mask without thin strokes (a stray line, a neighbour's tail; up to two pixels wide): opened, then given
    back the pixels next to what stayed, so the body's own corners and edges are kept."""
    body = ndimage.binary_opening(mask, iterations=1)
    return mask & ndimage.binary_dilation(body, iterations=1) if body.any() else mask


def fit_object(masks: ObjectMasks, shape: str) -> Fit:
    """The better of the shape's fits to the object's two masks."""
    return max(fit_shape(masks.tight, shape), fit_shape(masks.loose, shape), key=lambda fit: fit.iou)


def _background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def _ring(pixels: np.ndarray, depth: int) -> np.ndarray:
    """The pixels ``depth`` pixels in from the image's edge, all round."""
    inner = pixels[depth:pixels.shape[0] - depth, depth:pixels.shape[1] - depth]
    return np.concatenate([inner[0], inner[-1], inner[1:-1, 0], inner[1:-1, -1]])


def without_frame(pixels: np.ndarray) -> np.ndarray:
    """The image with a thin frame along its border (the watermark LoRA draws one) painted over in the colour just
    inside it: otherwise the frame would be read as the background and every object in it as part of one texture.
    A frame is up to :data:`FRAME_DEPTH` - 1 outer rings of pixels, each with a good part far from that inner colour,
    round a ring that is clean background."""
    depth = min(FRAME_DEPTH, min(pixels.shape[:2]) // 8)
    if depth < 1:
        return pixels
    inside = np.median(_ring(pixels, depth), axis=0)

    def far(ring: int) -> float:  # the share of a ring's pixels far from the colour inside
        return float(np.mean(np.linalg.norm(_ring(pixels, ring) - inside, axis=-1) > CONTRAST))

    frame = 0
    while frame < depth and far(frame) > FRAME_SHARE:
        frame += 1
    # no frame, or nothing but "frame" (noise, a texture): leave the image as it is
    if frame == 0 or frame == depth or far(frame) > BORDER_LIMIT / 2:
        return pixels
    painted = np.repeat(np.repeat(inside[None, None], pixels.shape[0], 0), pixels.shape[1], 1).astype(pixels.dtype)
    painted[frame:-frame, frame:-frame] = pixels[frame:-frame, frame:-frame]
    return painted


def hole_share(mask: np.ndarray) -> float:
    """The share of the object's outline (the mask with its holes filled) that is hole."""
    filled = ndimage.binary_fill_holes(mask)
    return float((filled.sum() - mask.sum()) / filled.sum()) if filled.any() else 0.0


# A shape's free proportion, besides position, scale and rotation, for the first guess: a triangle's height (1: the
# generator's equilateral one; a flatter or taller triangle is still a triangle to the eye), before its corners move
# freely; a square's corners may be rounded (a superellipse of exponent 8 or 5 besides the sharp square: the eye still
# sees a square in a rounded one, while a circle fits these worse than itself). The other shapes have none: an oval
# is no circle, an oblong no square.
VARIANTS: dict[str, tuple[float | None, ...]] = {"triangle": (0.6, 0.8, 1.0, 1.25), "square": (None, 8.0, 5.0)}


def _outline(shape: str, r: float, variant: float | None = None) -> list[np.ndarray]:
    """The shape's boundary polygons at half-extent ``r`` about the origin, as :func:`microworld.scenes.shape_sdf`
    defines it (a ring: outer and inner circle as 64-gons, the inner one — a hole — 0.44 of the outer; a triangle:
    its height times ``variant``)."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        unit = np.stack([np.cos(t), np.sin(t)], axis=1)
        return [unit * r] if shape == "circle" else [unit * r, unit * 0.44 * r]
    if shape == "square":
        a = 0.85 * r
        if variant is None:
            return [np.array([[-a, -a], [a, -a], [a, a], [-a, a]])]
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)  # a superellipse: |x|^p + |y|^p = a^p, corners rounded
        c, s = np.cos(t), np.sin(t)
        return [a * np.stack([np.sign(c) * np.abs(c) ** (2 / variant), np.sign(s) * np.abs(s) ** (2 / variant)], 1)]
    if shape == "triangle":
        h = 1.8 * r
        half = h / np.sqrt(3)
        h *= 1.0 if variant is None else variant
        return [np.array([[0.0, -h / 2], [half, h / 2], [-half, h / 2]])]
    if shape == "star":
        return [_regular_star(5, r * 1.05, r * 0.45) - [0.0, 0.08 * r]]
    if shape == "heart":
        return [_HEART * r]
    if shape == "cross":
        a, b = 0.34 * r, r
        return [np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                          [-b, -a], [-a, -a]])]
    raise ValueError(f"unknown shape {shape!r}")


def _rotation(angle: float) -> np.ndarray:
    a = np.deg2rad(angle)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _rasterise(polygons: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """The first polygon filled on an h×w grid, the others cut out of it as holes."""
    canvas = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for index, points in enumerate(polygons):
        draw.polygon([tuple(p) for p in points], fill=0 if index else 1)
    return np.asarray(canvas, dtype=bool)


def _ideal(shape: str, h: int, w: int, cx: float, cy: float, r: float, angle: float,
           variant: float | None = None) -> np.ndarray:
    """The generator's shape rasterised on an h×w grid (pixels; centre cx, cy), rotated by ``angle`` degrees."""
    rotation = _rotation(angle)
    return _rasterise([polygon @ rotation.T + [cx, cy] for polygon in _outline(shape, r, variant)], h, w)


def _unit_area(shape: str) -> float:
    """Area of the shape at half-extent 1 (pixels² per r²), for a first guess of the scale."""
    return float(_ideal(shape, 200, 200, 100.0, 100.0, 80.0, 0.0).sum()) / 80.0 ** 2


_UNIT_AREA = {shape: _unit_area(shape) for shape in SHAPES}


@functools.cache
def _variant_area(shape: str, variant: float) -> float:
    return float(_ideal(shape, 200, 200, 100.0, 100.0, 60.0, 0.0, variant).sum()) / 60.0 ** 2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fit_shape(mask: np.ndarray, shape: str) -> Fit:
    """The best IoU of ``mask`` with ``shape`` over position, scale and rotation (coarse grid, then refined);
    the fit's centre and radius are given in the mask's own (normalised) coordinates."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return Fit(shape, 0.0, 0.5, 0.5, 0.0, 0.0)
    if shape == "ring":
        # a ring is a closed band round a real hole: its outline is fitted as a circle (the eye accepts a lumpy band
        # or an off-centre hole as long as the loop closes round)
        if hole_share(mask) < SMALL_HOLE:
            return Fit(shape, 0.0, 0.5, 0.5, 0.0, 0.0)
        outline = fit_shape(ndimage.binary_fill_holes(mask), "circle")
        return Fit(shape, outline.iou, outline.cx, outline.cy, outline.radius, 0.0, outline.deviation,
                   outline.solidity)
    h, w = mask.shape
    margin = max(3, int(0.5 * max(xs.max() - xs.min(), ys.max() - ys.min())))  # room for a larger ideal shape
    top, left = max(0, ys.min() - margin), max(0, xs.min() - margin)
    window = mask[top:ys.max() + margin + 1, left:xs.max() + margin + 1]
    fit = _fit_window(window, shape)
    wh, ww = window.shape
    return Fit(shape, fit.iou, round((left + fit.cx * ww) / w, 4), round((top + fit.cy * wh) / h, 4), fit.radius,
               fit.angle, fit.deviation, solidity(mask))


def _fit_window(mask: np.ndarray, shape: str) -> Fit:
    big = np.kron(mask.astype(np.uint8), np.ones((UPSAMPLE, UPSAMPLE), np.uint8)).astype(bool)
    h, w = big.shape
    area = big.sum()
    if area == 0:
        return Fit(shape, 0.0, 0.5, 0.5, 0.0, 0.0)
    ys, xs = np.nonzero(big)
    cx0, cy0 = xs.mean() + 0.5, ys.mean() + 0.5
    r0 = np.sqrt(area / _UNIT_AREA[shape])
    period = SYMMETRY[shape]
    low, high = ROTATIONS.get(shape, (0.0, float(period)))
    angles = [0.0] if not period else list(np.arange(low, high, 10.0 if shape in ROTATIONS else 15.0))
    variants = VARIANTS.get(shape, (None,))
    best = (-1.0, cx0, cy0, r0, 0.0, variants[0])
    step = max(1.0, r0 * 0.12)
    for variant in variants:
        # the variant changes the shape's area: the first guess of its scale follows
        base = r0 * np.sqrt(_UNIT_AREA[shape] / _variant_area(shape, variant)) if variant is not None else r0
        for angle in angles:
            for dx in (-step, 0.0, step):
                for dy in (-step, 0.0, step):
                    for scale in (0.85, 0.93, 1.0, 1.08, 1.16):
                        score = _iou(big, _ideal(shape, h, w, cx0 + dx, cy0 + dy, base * scale, angle, variant))
                        if score > best[0]:
                            best = (score, cx0 + dx, cy0 + dy, base * scale, angle, variant)
    score, cx, cy, r, angle, variant = best
    for _ in range(2):  # refine around the best: half the steps
        step, angle_step = step / 2, 5.0 if period else 0.0
        for da in ((-angle_step, 0.0, angle_step) if period else (0.0,)):
            if period and not low <= angle + da <= high:
                continue
            for dx in (-step, 0.0, step):
                for dy in (-step, 0.0, step):
                    for scale in (0.96, 1.0, 1.04):
                        trial = _iou(big, _ideal(shape, h, w, cx + dx, cy + dy, r * scale, angle + da, variant))
                        if trial > score:
                            score, cx, cy, r, angle = trial, cx + dx, cy + dy, r * scale, angle + da
    ideal = _ideal(shape, h, w, cx, cy, r, angle, variant)
    if shape in FREE_POLYGONS:
        corners = _outline(shape, r, variant)[0] @ _rotation(angle).T + [cx, cy]
        free_score, corners = _refine_corners(big, corners, step=r * 0.16)
        if free_score > score:
            score, ideal = free_score, _rasterise([corners], h, w)
            cx, cy = (corners.min(axis=0) + corners.max(axis=0)) / 2  # the generator centres a shape's box
    return Fit(shape, round(score, 4), round(cx / w, 4), round(cy / h, 4), round(r / UPSAMPLE, 2),
               round(angle % period if period else 0.0, 1), round(_deviation(big, ideal) / r, 4))


def solidity(mask: np.ndarray) -> float:
    """The mask's area (holes filled) over the area of its convex hull (pixels as unit squares)."""
    filled = ndimage.binary_fill_holes(mask)
    ys, xs = np.nonzero(filled)
    if len(xs) < 3:
        return 1.0
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull = ConvexHull(corners)
    except QhullError:  # every pixel on one line
        return 1.0
    return float(filled.sum() / hull.volume)


def _deviation(mask: np.ndarray, ideal: np.ndarray) -> float:
    """Twice the depth of the thickest part of where ``mask`` and ``ideal`` differ (pixels): the width of the
    largest bump or dent."""
    return 2.0 * float(ndimage.distance_transform_edt(mask ^ ideal).max())


# Shapes whose corners may move freely (any triangle, not only the generator's isosceles ones: a wedge or a slanted
# triangle is still a triangle to the eye). A square's corners stay put: a rhombus or an oblong is not a square.
FREE_POLYGONS = ("triangle",)


def _refine_corners(mask: np.ndarray, corners: np.ndarray, step: float, rounds: int = 3) -> tuple[float, np.ndarray]:
    """Move each corner of a polygon to wherever the IoU with ``mask`` grows (eight directions, steps halving)."""
    h, w = mask.shape
    corners = corners.astype(np.float64).copy()
    score = _iou(mask, _rasterise([corners], h, w))
    moves = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    for _ in range(rounds):
        improved = True
        while improved:
            improved = False
            for index in range(len(corners)):
                for dx, dy in moves:
                    trial = corners.copy()
                    trial[index] += (dx * step, dy * step)
                    value = _iou(mask, _rasterise([trial], h, w))
                    if value > score + 1e-6:
                        score, corners, improved = value, trial, True
        step /= 2
    return score, corners


def name_shape(fits: list[Fit], thresholds: dict[str, float] | None = None,
               preference: dict[str, float] | None = None, deviations: dict[str, float] | None = None,
               min_solidity: float | None = None) -> Fit | None:
    """The shape the object is: the best fit (with :data:`PREFERENCE`), if it reaches its shape's threshold, no part
    of it strays further than the shape's :data:`DEVIATIONS` and, for a convex shape, it is solid enough
    (:data:`MIN_SOLIDITY`); None for a malformed object. (Taking the best of those that pass would let a blob that
    fits a circle badly be a star, whose bar is lower.) The keyword tables replace the shipped ones (for fitting)."""
    thresholds = THRESHOLDS if thresholds is None else thresholds
    preference = PREFERENCE if preference is None else preference
    deviations = DEVIATIONS if deviations is None else deviations
    min_solidity = MIN_SOLIDITY if min_solidity is None else min_solidity
    best = max(fits, key=lambda fit: fit.iou + preference.get(fit.shape, 0.0))
    if best.iou < thresholds.get(best.shape, MALFORMED_BELOW) or best.deviation > deviations.get(best.shape, 1.0):
        return None
    return None if best.shape in CONVEX and best.solidity < min_solidity else best


def position(mask: np.ndarray, centre: tuple[float, float] | None = None) -> str | None:
    """The place among the generator's nine of ``centre`` (normalised), by default the mask's bounding-box centre
    (the generator places an object by its shape's centre, which is its bounding box's; a fitted shape's own centre,
    :class:`Fit`, is better where there is one)."""
    if centre is not None:
        return position_of(*centre)
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    return position_of((xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h)
