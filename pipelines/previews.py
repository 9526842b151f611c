"""Previews of latents as strategies keyed by the model's latent format: channel grid, latent→RGB, VAE decode.

Only the first image of a batch is ever previewed. Every strategy returns a uint8 numpy array, small
enough to stream to a browser or write as a PNG.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.families import Family, family_of

PREVIEW_KINDS = ("channels", "rgb", "decode")  # channel grid, latent→RGB linear map, full VAE decode
PREVIEW_FILE = "latent_preview.json"  # fitted factors stored beside a model (our embedded model has one)


@dataclass(frozen=True)
class LatentFormat:
    """How a model's latents look: channel count and a linear latent→RGB approximation.

    The factors apply to model-space latents (what the denoiser sees, after the VAE scaling factor) and
    give RGB roughly in [-1, 1]: rgb = latents · factors + bias.
    """

    name: str  # short name shown in the UI
    channels: int  # latent channels C
    rgb_factors: tuple[tuple[float, float, float], ...] | None  # (C, 3), None when no map is known
    rgb_bias: tuple[float, float, float]  # (3,)
    source: str  # where the factors come from


# Published factors, from ComfyUI's comfy/latent_formats.py (GPL-3.0 project; numbers only).
SD1 = LatentFormat("sd1", 4, (
    (0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177),
), (0.0, 0.0, 0.0), "ComfyUI latent_formats.SD15")
SDXL = LatentFormat("sdxl", 4, (
    (0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188),
), (0.1084, -0.0175, -0.0011), "ComfyUI latent_formats.SDXL")
SD3 = LatentFormat("sd3", 16, (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
), (0.2394, 0.2135, 0.1925), "ComfyUI latent_formats.SD3")

# PixArt-Σ uses the SDXL VAE.
FORMAT_BY_FAMILY: dict[str, LatentFormat] = {"sd": SD1, "sdxl": SDXL, "pixart_sigma": SDXL, "sd3": SD3}


def load_format_file(path: str | os.PathLike) -> LatentFormat:
    """A fitted format from a model folder's latent_preview.json."""
    data = json.loads(Path(path).read_text())
    factors = tuple(tuple(float(v) for v in row) for row in data["latent_rgb_factors"])
    bias = tuple(float(v) for v in data.get("latent_rgb_bias", (0.0, 0.0, 0.0)))
    if any(len(row) != 3 for row in factors) or len(bias) != 3:
        raise ValueError(f"{path}: latent_rgb_factors must be C rows of 3 numbers and latent_rgb_bias 3 numbers")
    return LatentFormat(data.get("name", Path(path).parent.name), len(factors), factors, bias, f"fitted ({Path(path).name})")


def latent_format_for(pipe, family: Family | None = None) -> LatentFormat:
    """The latent format of a loaded pipeline: fitted factors stored with the model win over published ones.

    When the VAE's channel count does not match the family's published format (tiny test models, custom
    VAEs), the format has no RGB map and only the channel grid and VAE decode are offered.
    """
    family = family or family_of(pipe)
    folder = pipe.config.get("_name_or_path") or ""
    fitted = Path(folder) / PREVIEW_FILE if folder else None
    channels = pipe.vae.config.latent_channels
    if fitted is not None and fitted.is_file():
        fmt = load_format_file(fitted)
    else:
        fmt = FORMAT_BY_FAMILY[family.key]
    if fmt.channels != channels:
        return LatentFormat(f"{channels}-channel", channels, None, (0.0, 0.0, 0.0), "no published map for this VAE")
    return fmt


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def channel_grid(latents: torch.Tensor, gap: int = 1) -> np.ndarray:
    """First image's channels (C, h, w), each min–max normalized, tiled in a near-square grey grid (H, W)."""
    z = latents[0].detach().float().cpu().numpy()
    c, h, w = z.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid = np.ones((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), dtype=np.float32)
    for i in range(c):
        ch = z[i]
        lo, hi = float(ch.min()), float(ch.max())
        ch = (ch - lo) / (hi - lo) if hi > lo else np.zeros_like(ch)
        r, col = divmod(i, cols)
        grid[r * (h + gap): r * (h + gap) + h, col * (w + gap): col * (w + gap) + w] = ch
    return _to_uint8(grid)


def latent_rgb(latents: torch.Tensor, fmt: LatentFormat) -> np.ndarray:
    """First image's latents -> (h, w, 3) RGB by the format's linear map (no VAE)."""
    if fmt.rgb_factors is None:
        raise ValueError(f"no latent→RGB map for the {fmt.name} latent format; use 'channels' or 'decode'")
    z = latents[0].detach().float().cpu()
    factors = torch.tensor(fmt.rgb_factors, dtype=torch.float32)
    rgb = torch.einsum("chw,ck->hwk", z, factors) + torch.tensor(fmt.rgb_bias)
    return _to_uint8(((rgb + 1.0) / 2.0).numpy())


class Previewer:
    """Renders latents of one loaded pipeline with any of the preview strategies."""

    def __init__(self, pipe, family: Family | None = None, fmt: LatentFormat | None = None) -> None:
        self.pipe = pipe
        self.family = family or family_of(pipe)
        self.format = fmt or latent_format_for(pipe, self.family)
        self.scale = pipe.vae_scale_factor  # pixels per latent cell

    @property
    def kinds(self) -> tuple[str, ...]:
        """Strategies available for this model."""
        return PREVIEW_KINDS if self.format.rgb_factors is not None else ("channels", "decode")

    def render(self, kind: str, latents: torch.Tensor, upscale: bool = True) -> np.ndarray:
        """uint8 image of the first latent in the batch; `upscale` brings latent-resolution previews to pixel size."""
        if kind == "channels":
            return channel_grid(latents)
        if kind == "rgb":
            rgb = latent_rgb(latents, self.format)
            return rgb.repeat(self.scale, 0).repeat(self.scale, 1) if upscale else rgb
        if kind == "decode":
            return self.decode(latents)
        raise ValueError(f"unknown preview kind {kind!r}; choose one of: {', '.join(self.kinds)}")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Full VAE decode of the first latent -> (H, W, 3) uint8."""
        z = latents[:1].to(self.pipe.vae.device)
        image = self.family.decode(self.pipe, z)
        return _to_uint8((image[0].float().clamp(-1, 1).permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0)
