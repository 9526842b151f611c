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


BANDS = ("low", "mid", "high")  # spatial-frequency bands of band_change(), coarse to fine
BAND_EDGES = (1 / 8, 1 / 2)  # band limits as fractions of the Nyquist frequency (radial): low < 1/8 ≤ mid < 1/2 ≤ high


def band_change(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> tuple[float, float, float]:
    """How much b differs from a in low, middle and high spatial frequencies: the radial power of the 2-D FFT of
    b − a (per RGB channel, pixels in [0, 1]) summed over each band of BAND_EDGES, as RMS pixel units. By Parseval
    low² + mid² + high² = rms(a, b)², so each band's share of the change is its square over that sum. On a 64² image
    the low band holds periods of more than 16 px (fewer than 4 cycles across: the layout), the high band periods
    under 4 px (edges and texture)."""
    diff = pixels(b) - pixels(a)  # (H, W, 3)
    h, w = diff.shape[:2]
    power = np.abs(np.fft.fft2(diff, axes=(0, 1))) ** 2  # (H, W, 3)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")  # cycles per pixel, Nyquist 0.5
    radius = np.sqrt(fx ** 2 + fy ** 2) / 0.5
    edges = [0.0, *BAND_EDGES, np.inf]
    total = float(h * w) ** 2 * 3  # Parseval: mean(diff²) = Σ|F|² / (H·W)², then the mean over 3 channels
    return tuple(float(np.sqrt(power[(radius >= lo) & (radius < hi)].sum() / total))  # type: ignore[return-value]
                 for lo, hi in zip(edges, edges[1:]))
