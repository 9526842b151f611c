"""A strict geometric reading of a one-object picture of the shapes world: no learned part, every attribute measured.

Where the judge (judge.py) classifies shapes with a small CNN and names the nearest palette colour however far it is,
this reading answers only what the pixels show clearly, and None otherwise:
- background: the median of the 2-pixel border, the palette colour within BACKGROUND_TOLERANCE of it;
- object: the largest connected region away from the background (judge.coverage);
- colour: the median of the object's eroded core, the palette colour within COLOR_TOLERANCE of it;
- shape: each of the world's shapes is drawn (world.shape_polygon, anti-aliased as world.render draws it) at the
  object's bounding-box centre with the area of the object's coverage, shifted by up to one pixel; the shape whose
  drawing overlaps the coverage best (soft IoU) is read when that IoU is at least SHAPE_IOU and beats the runner-up
  by SHAPE_MARGIN;
- position: the cell of the 3x3 grid that holds the bounding-box centre (world.CELLS);
- size: the circumradius of the best-fitting shape against the midpoint of world.SIZES.

A picture that does not show these clearly (a smear, two blobs, an off-palette colour) fails the attribute: that is
the point of a strict reading. Ground-truth renders read 100% on every attribute (tests/test_reading.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from shapes import world
from shapes.judge import MIN_AREA, coverage

BACKGROUND_TOLERANCE = 60.0  # RGB distance; the world jitters each channel by at most 12 (distance <= 21)
COLOR_TOLERANCE = 70.0  # RGB distance from the object's core colour to its palette colour
SHAPE_IOU = 0.72  # soft IoU of the best shape drawing with the coverage
SHAPE_MARGIN = 0.03  # the best IoU must beat the second best by this much
SIZE_SPLIT = (world.SIZES["small"] + world.SIZES["large"]) / 2  # circumradius in pixels
_PALETTE = np.array(list(world.COLORS.values()), dtype=np.float32)
_NAMES = list(world.COLORS)
_SS = 4  # supersampling of the shape drawings, as world.SUPERSAMPLE


@dataclass(frozen=True)
class Reading:
    """What the pixels show clearly; None where an attribute is not clear (or no object was found)."""

    found: bool  # one object region of at least judge.MIN_AREA pixels
    color: str | None
    shape: str | None
    position: str | None
    size: str | None
    background: str | None
    shape_iou: float  # soft IoU of the best shape drawing (0 when no object)

    def matches(self, **expected: str) -> dict[str, bool]:
        """{attribute: read value == expected value} for the attributes given (color, shape, position, size, background)."""
        return {k: getattr(self, k) == v for k, v in expected.items()}


def _palette_name(rgb: np.ndarray, tolerance: float) -> str | None:
    d = np.sqrt(((_PALETTE - rgb) ** 2).sum(1))
    i = int(np.argmin(d))
    return _NAMES[i] if d[i] <= tolerance else None


@lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of the shape's polygon at circumradius 1 (shoelace formula)."""
    pts = world.shape_polygon(shape, 0.0, 0.0, 1.0)
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2


def _bbox_centre(shape: str, r: float) -> tuple[float, float]:
    pts = world.shape_polygon(shape, 0.0, 0.0, r)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2


def _draw(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> np.ndarray:
    """Coverage (h, w) in [0, 1] of the shape with its bounding box centred on (cx, cy), drawn as world.render does."""
    ox, oy = _bbox_centre(shape, r)
    img = Image.new("L", (w * _SS, h * _SS), 0)
    poly = [((x - ox) * _SS, (y - oy) * _SS) for x, y in world.shape_polygon(shape, cx, cy, r)]
    ImageDraw.Draw(img).polygon(poly, fill=255)
    return np.asarray(img.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def read(image: Image.Image | np.ndarray) -> Reading:
    """Read one picture (PIL or uint8 (H, W, 3); the world's 64x64 scale) strictly."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    a = arr.astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    background = _palette_name(np.median(border, 0), BACKGROUND_TOLERANCE)
    cov = coverage(arr)
    if cov is None or (cov[0] > 0.5).sum() < MIN_AREA:
        return Reading(False, None, None, None, None, background, 0.0)
    alpha, fg, _ = cov
    color = _palette_name(fg, COLOR_TOLERANCE)
    ys, xs = np.nonzero(alpha > 0.5)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    area = float(alpha.sum())
    row, col = min(2, int(cy * 3 / h)), min(2, int(cx * 3 / w))
    fits = {}
    for shape in world.SHAPES:
        r = math.sqrt(area / _unit_area(shape))
        best = max(_soft_iou(alpha, _draw(shape, cx + dx, cy + dy, r, h, w))
                   for dx in (-1.0, 0.0, 1.0) for dy in (-1.0, 0.0, 1.0))
        fits[shape] = (best, r)
    ranked = sorted(fits, key=lambda s: fits[s][0], reverse=True)
    iou, radius = fits[ranked[0]]
    clear = iou >= SHAPE_IOU and iou - fits[ranked[1]][0] >= SHAPE_MARGIN
    shape = ranked[0] if clear else None
    size = "large" if radius > SIZE_SPLIT else "small"
    return Reading(True, color, shape, world.CELLS[(row, col)], size, background, iou)
