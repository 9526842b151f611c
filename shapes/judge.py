"""Automatic judge of a single-object image: colour (pixel statistics vs the palette), shape (a tiny CNN on the
object's coverage map, trained on renders), position (centroid -> 3x3 cell), size (bounding-box extent).

Validated on ground-truth renders (tests/test_training.py, and `python -m training.train_judge --validate`).
Its shape classifier is trained by `python -m training.train_judge --train` (writes shapes/judge_shape.safetensors).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy import ndimage

from shapes import world

WEIGHTS = Path(__file__).resolve().parent / "judge_shape.safetensors"
CROP = 32  # coverage map crop around the object's centroid, at native scale
FG_THRESHOLD = 55.0  # RGB distance from the background: half the closest palette pair (red-orange ~110)
SIZE_EXTENT = 13.2  # px: small objects span <= ~12.4, large >= ~14.0 (see world.SIZES and shape_polygon)
MIN_AREA = 6  # px: fewer foreground pixels than this means "no object"
_PALETTE = np.array(list(world.COLORS.values()), dtype=np.float32)
_NAMES = list(world.COLORS)


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in one image; None where no object was found."""

    found: bool
    color: str | None
    shape: str | None
    position: str | None
    size: str | None
    background: str | None


class ShapeNet(torch.nn.Module):
    """(B, 1, 32, 32) coverage in [0, 1] -> (B, 5) shape logits."""

    def __init__(self) -> None:
        super().__init__()
        c = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.features = torch.nn.Sequential(c(1, 16), c(16, 32), c(32, 64))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, len(world.SHAPES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(1)))]


def coverage(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """uint8 (H, W, 3) -> (coverage (H, W) in [0, 1] of the largest object, its colour, the background), or None."""
    a = img.astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, 0)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    labels, n = ndimage.label(dist > FG_THRESHOLD)
    if n == 0:
        return None
    sizes = ndimage.sum(np.ones_like(dist), labels, range(1, n + 1))
    k = int(np.argmax(sizes)) + 1
    if sizes[k - 1] < MIN_AREA:
        return None
    region = labels == k
    core = ndimage.binary_erosion(region)
    fg = np.median(a[core if core.sum() >= 3 else region], 0)
    d = fg - bg
    alpha = np.clip(((a - bg) @ d) / max(float(d @ d), 1e-6), 0, 1)
    alpha *= ndimage.binary_dilation(region, iterations=2)  # keep only the chosen object's edge pixels
    return alpha, fg, bg


def crop(alpha: np.ndarray) -> np.ndarray:
    """(H, W) coverage -> (CROP, CROP) window centred on its centroid, zero-padded."""
    ys, xs = np.nonzero(alpha > 0.5)
    if len(ys) == 0:
        ys, xs = np.nonzero(alpha > 0)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    pad = np.pad(alpha, CROP)
    return pad[cy + CROP - CROP // 2 : cy + CROP + CROP // 2, cx + CROP - CROP // 2 : cx + CROP + CROP // 2]


class Judge:
    """Loads the shape classifier once; call judge(image) -> Verdict."""

    def __init__(self, weights: Path = WEIGHTS) -> None:
        self.net = ShapeNet()
        self.net.load_state_dict(load_file(str(weights)))
        self.net.eval()

    def __call__(self, image: Image.Image | np.ndarray) -> Verdict:
        return self.batch([image])[0]

    @torch.no_grad()
    def batch(self, images: list[Image.Image | np.ndarray]) -> list[Verdict]:
        partial, crops = [], []
        for im in images:
            arr = np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im)
            cov = coverage(arr)
            if cov is None:
                partial.append(None)
                continue
            alpha, fg, bg = cov
            mask = alpha > 0.5
            if mask.sum() < MIN_AREA:
                partial.append(None)
                continue
            ys, xs = np.nonzero(mask)
            h, w = arr.shape[:2]
            cy = (alpha * np.arange(h)[:, None]).sum() / alpha.sum()
            cx = (alpha * np.arange(w)[None, :]).sum() / alpha.sum()
            row, col = min(2, int(cy * 3 / h)), min(2, int(cx * 3 / w))
            extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) * 64 / max(h, w)
            partial.append((_nearest_color(fg), world.CELLS[(row, col)], "large" if extent > SIZE_EXTENT else "small", _nearest_color(bg)))
            crops.append(crop(alpha))
        shapes = []
        if crops:
            logits = self.net(torch.from_numpy(np.stack(crops)).float()[:, None])
            shapes = [world.SHAPES[i] for i in logits.argmax(1).tolist()]
        out, j = [], 0
        for p in partial:
            if p is None:
                out.append(Verdict(False, None, None, None, None, None))
            else:
                out.append(Verdict(True, p[0], shapes[j], p[1], p[2], p[3]))
                j += 1
        return out


def validate(judge: Judge, n: int = 500, seed: int = 999) -> dict[str, float]:
    """Accuracy of each attribute on ground-truth single-object renders."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, two_objects=False) for _ in range(n)]
    verdicts = judge.batch([world.render(s) for s in scenes])
    acc = {k: 0 for k in ("color", "shape", "position", "size", "background", "all")}
    for s, v in zip(scenes, verdicts):
        o = s.objects[0]
        hits = {"color": v.color == o.color, "shape": v.shape == o.shape, "position": v.position == o.position,
                "size": v.size == o.size, "background": v.background == s.background}
        for k, h in hits.items():
            acc[k] += h
        acc["all"] += all(hits.values())
    return {k: c / n for k, c in acc.items()}


def prompt_targets(prompt: str) -> dict[str, str]:
    """The attributes of a one-object shapes-world prompt the judge can check; ValueError if it cannot score it."""
    text = " " + re.sub(r"[^a-z ]+", " ", prompt.lower().replace("-", " ")) + " "
    text = re.sub(r"\s+", " ", text)
    out: dict[str, str] = {}
    bg = re.search(r"(?: on an? | )(\w+) background ", text)
    if bg and bg.group(1) in world.COLORS:
        out["background"] = bg.group(1)
        text = text[:bg.start()] + " " + text[bg.end():]
    if any(f" {r} " in text for r in world.RELATIONS):
        raise ValueError("the judge scores one-object prompts; this one relates two objects")
    shapes = [s for s in world.SHAPES if re.search(rf" {s}s? ", text)]
    if len(shapes) != 1:
        raise ValueError(f"the judge scores prompts that name one shape ({', '.join(world.SHAPES)}); "
                         f"{'none' if not shapes else ', '.join(shapes)} found in {prompt!r}")
    out["shape"] = shapes[0]
    colors = [c for c in world.COLORS if f" {c} " in text]
    if len(colors) > 1:
        raise ValueError(f"the judge scores one-object prompts; {prompt!r} names several colours ({', '.join(colors)})")
    if colors:
        out["color"] = colors[0]
    sizes = [s for s in world.SIZES if f" {s} " in text]
    if len(sizes) == 1:
        out["size"] = sizes[0]
    phrases = sorted(((p.replace("-", " "), pos) for pos, ps in world.POSITION_PHRASES.items() for p in ps),
                     key=lambda t: -len(t[0]))
    for phrase, pos in phrases:
        if f" {phrase} " in text:
            out["position"] = pos
            break
    return out
