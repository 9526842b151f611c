"""The shapes world: seeded scenes of one or two coloured shapes on a plain background, rendered with Pillow, and captions that describe them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SUPERSAMPLE = 4  # render at 4x and box-filter down, for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 60),
    "blue": (35, 75, 220),
    "yellow": (245, 220, 35),
    "purple": (135, 55, 185),
    "orange": (250, 140, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SIZES = {"small": 5.5, "large": 9.5}  # circumradius in pixels (the 64x64 image)
# 3x3 grid: (row, col) -> name; cell centres at 1/6, 3/6, 5/6 of the side.
CELLS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITIONS = tuple(CELLS.values())
RELATIONS = ("above", "below", "to the left of", "to the right of")

COLOR_JITTER = 12  # max per-channel jitter, so colours stay close to their everyday meaning
POS_JITTER = 2.0  # max centre jitter in pixels
SIZE_JITTER = 0.08  # relative radius jitter
P_TWO_OBJECTS = 0.2
P_EMPTY_CAPTION = 0.1


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; cx, cy, radius are in pixels of the 64x64 image."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two objects; `relation` links objects[0] to objects[1]."""

    background: str
    bg_rgb: tuple[int, int, int]
    objects: tuple[Obj, ...]
    relation: str | None = None
    meta: dict = field(default_factory=dict, compare=False)


def _jitter_rgb(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER)))) for c in rgb)


def _cell_centre(row: int, col: int) -> tuple[float, float]:
    return (col * 2 + 1) * SIZE / 6, (row * 2 + 1) * SIZE / 6


def make_obj(shape: str, color: str, size: str, row: int, col: int, rng: random.Random) -> Obj:
    cx, cy = _cell_centre(row, col)
    cx += rng.uniform(-POS_JITTER, POS_JITTER)
    cy += rng.uniform(-POS_JITTER, POS_JITTER)
    radius = SIZES[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    return Obj(shape, color, size, CELLS[(row, col)], cx, cy, radius, _jitter_rgb(COLORS[color], rng))


def sample_scene(rng: random.Random, two_objects: bool | None = None) -> Scene:
    """Draw a random scene; two_objects=None draws one object with probability 1 - P_TWO_OBJECTS."""
    if two_objects is None:
        two_objects = rng.random() < P_TWO_OBJECTS
    names = list(COLORS)
    if not two_objects:
        color = rng.choice(names)
        bg = rng.choice([c for c in names if c != color])
        row, col = rng.randrange(3), rng.randrange(3)
        obj = make_obj(rng.choice(SHAPES), color, rng.choice(list(SIZES)), row, col, rng)
        return Scene(bg, _jitter_rgb(COLORS[bg], rng), (obj,))
    c1, c2 = rng.sample(names, 2)
    bg = rng.choice([c for c in names if c not in (c1, c2)])
    relation = rng.choice(RELATIONS)
    # Same column for above/below, same row for left/right; objects[0] is the subject.
    if relation in ("above", "below"):
        col = rng.randrange(3)
        r1, r2 = rng.sample(range(3), 2)
        if (relation == "above") != (r1 < r2):
            r1, r2 = r2, r1
        cells = ((r1, col), (r2, col))
    else:
        row = rng.randrange(3)
        k1, k2 = rng.sample(range(3), 2)
        if (relation == "to the left of") != (k1 < k2):
            k1, k2 = k2, k1
        cells = ((row, k1), (row, k2))
    objs = tuple(
        make_obj(rng.choice(SHAPES), c, rng.choice(list(SIZES)), r, k, rng) for c, (r, k) in zip((c1, c2), cells)
    )
    return Scene(bg, _jitter_rgb(COLORS[bg], rng), objs, relation)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r centred at (cx, cy); y points down."""
    if shape == "circle":
        n = 64
        return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]
    if shape == "square":
        h = r * 0.8  # half side: a square of equal visual weight to the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, apex up, centred on its bounding box so the centroid cue matches the cell.
        rr = r * 1.1
        pts = [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        top, bottom = pts[0][1], pts[1][1]
        dy = cy - (top + bottom) / 2
        return [(x, y + dy) for x, y in pts]
    if shape == "star":
        rr = r * 1.1
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rad = rr if i % 2 == 0 else rr * 0.45
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "heart":
        # Classic parametric heart, x in [-16, 16], y in [-17, 12] before scaling; flipped so the point is down.
        pts = []
        for i in range(80):
            t = 2 * math.pi * i / 80
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x, -y))
        s = r / 16.0
        ys = [p[1] for p in pts]
        dy = (max(ys) + min(ys)) / 2
        return [(cx + x * s, cy + (y - dy) * s) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    big = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.bg_rgb)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        poly = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in shape_polygon(o.shape, o.cx, o.cy, o.radius)]
        draw.polygon(poly, fill=o.rgb)
    return img.resize((SIZE, SIZE), Image.BOX)


# ---- captions -------------------------------------------------------------------------------

POSITION_PHRASES = {
    "top left": ["in the top left", "at the top left", "in the top left corner"],
    "top": ["at the top", "in the top"],
    "top right": ["in the top right", "at the top right", "in the top right corner"],
    "left": ["on the left", "at the left"],
    "center": ["in the center", "in the middle", "at the center"],
    "right": ["on the right", "at the right"],
    "bottom left": ["in the bottom left", "at the bottom left", "in the bottom left corner"],
    "bottom": ["at the bottom", "in the bottom"],
    "bottom right": ["in the bottom right", "at the bottom right", "in the bottom right corner"],
}
for _corner in ("top left", "top right", "bottom left", "bottom right"):  # hyphenated, as people also type them
    POSITION_PHRASES[_corner] += [f"in the {_corner.replace(' ', '-')}", f"in the {_corner.replace(' ', '-')} corner"]
# Framings of a one-object caption besides the bare phrase (evaluate.paraphrase draws from them too).
FRAMES = ("an image of {}", "a picture of {}", "a drawing of {}")
P_SIZE, P_COLOR, P_POSITION, P_BACKGROUND, P_FULL_STOP = 0.7, 0.85, 0.75, 0.4, 0.15


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(o: Obj, rng: random.Random, p_size: float = P_SIZE, p_color: float = P_COLOR) -> str:
    """'large red circle' with size and colour each sometimes left out."""
    words = []
    if rng.random() < p_size:
        words.append(o.size)
    if rng.random() < p_color:
        words.append(o.color)
    words.append(o.shape)
    return " ".join(words)


def _end(text: str, rng: random.Random) -> str:
    """Sometimes a trailing full stop, as people type prompts either way."""
    return text + "." if rng.random() < P_FULL_STOP else text


def caption(scene: Scene, rng: random.Random, p_empty: float = P_EMPTY_CAPTION,
            p_background: float = P_BACKGROUND) -> str:
    """A caption true of the scene, from varied templates; '' with probability p_empty, the background named with
    probability p_background."""
    if rng.random() < p_empty:
        return ""
    bg = ""
    if rng.random() < p_background:
        bg = rng.choice([f" on {_article(scene.background)} background", f", {scene.background} background"])
    if len(scene.objects) == 1:
        o = scene.objects[0]
        text = _article(describe(o, rng))
        if rng.random() < P_POSITION:
            text += " " + rng.choice(POSITION_PHRASES[o.position])
        text = rng.choice(["{}", "{}", "{}", *FRAMES]).format(text)
        return _end(text + bg, rng)
    a, b = scene.objects
    text = f"{_article(describe(a, rng, p_color=0.95))} {scene.relation} {_article(describe(b, rng, p_color=0.95))}"
    return _end(text + bg, rng)


def full_caption(shape: str, color: str, size: str, position: str, background: str | None = None) -> str:
    """The evaluation prompt for one object with every attribute given."""
    text = f"{_article(f'{size} {color} {shape}')} {POSITION_PHRASES[position][0]}"
    return text + (f" on {_article(background)} background" if background else "")


def to_array(img: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 (3, H, W) in [-1, 1]."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def batch(rng: random.Random, n: int, p_empty: float = P_EMPTY_CAPTION) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random scenes: images (n, 3, 64, 64) in [-1, 1], captions, scenes."""
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([to_array(render(s)) for s in scenes])
    return images, [caption(s, rng, p_empty) for s in scenes], scenes


if __name__ == "__main__":
    rng = random.Random(0)
    grid = Image.new("RGB", (SIZE * 8, SIZE * 4))
    for i in range(32):
        s = sample_scene(rng)
        grid.paste(render(s), ((i % 8) * SIZE, (i // 8) * SIZE))
        print(i, caption(s, rng, p_empty=0))
    grid.save("/tmp/world_grid.png")
