"""Image measures of the Explain lab: distances are RMS over RGB pixels in [0, 1]; sharpness is the mean squared
Laplacian of the luminance in [0, 1] (high-frequency energy: a blurry average has little, crisp edges a lot)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as float32 (H, W, 3) in [0, 1]."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return a.astype(np.float32) / 255.0


def rms(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """RMS difference of two images in [0, 1] pixel units."""
    return float(np.sqrt(np.mean((pixels(a) - pixels(b)) ** 2)))


def sharpness(image: Image.Image | np.ndarray) -> float:
    """High-frequency energy: mean squared 4-neighbour Laplacian of the luminance (Rec. 601) in [0, 1]."""
    y = pixels(image) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.mean(lap ** 2))


def diversity(images: Sequence[Image.Image | np.ndarray]) -> float:
    """Mean pairwise RMS distance of images (0 when they are identical or fewer than two)."""
    arrays = [pixels(i) for i in images]
    pairs = [float(np.sqrt(np.mean((arrays[i] - arrays[j]) ** 2)))
             for i in range(len(arrays)) for j in range(i + 1, len(arrays))]
    return float(np.mean(pairs)) if pairs else 0.0
