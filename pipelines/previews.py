"""Previews of latents as strategies keyed by the model's latent format.

Kinds (see KIND_LABELS): the latent channels as a grey grid, a latent→RGB linear map, a tiny preview decoder
fitted to one model's VAE (shipped beside the model), TAESD (diffusers' AutoencoderTiny, when its weights are
already in the local Hugging Face cache or one is injected) and the full VAE decode.

Every strategy takes model-space latents (what the denoiser sees: already multiplied by the VAE's scaling factor,
and for SD3 and Flux already shifted; Flux's unpacked, (B, 16, h, w)), previews only the first image of a batch,
and returns a uint8 numpy array small enough to stream to a browser or write as a PNG.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from diffusers import AutoencoderTiny
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from pipelines.families import Family, family_of

# Every kind, cheapest first; Previewer.kinds says which of them one model offers.
KIND_LABELS: dict[str, str] = {
    "channels": "latent channels (min–max per channel)",
    "rgb": "latent→RGB linear map",
    "approx": "tiny preview decoder (fitted to this VAE)",
    "taesd": "TAESD (AutoencoderTiny)",
    "decode": "full VAE decode",
}
PREVIEW_KINDS = tuple(KIND_LABELS)
COLOUR_KINDS = ("rgb", "approx", "taesd", "decode")  # kinds that show colours (not the channel grid)
PREVIEW_FILE = "latent_preview.json"  # a fitted latent→RGB map stored beside a model
DECODER_FILE = "preview_decoder.safetensors"  # a fitted PreviewDecoder stored beside a model (fp16, config in metadata)


@dataclass(frozen=True)
class LatentFormat:
    """How a model's latents look: channel count, a linear latent→RGB map and the previewers that fit its VAE.

    The factors apply to model-space latents and give RGB roughly in [-1, 1]: rgb = latents · factors + bias.
    """

    name: str  # short name shown in the UI
    channels: int  # latent channels C
    rgb_factors: tuple[tuple[float, float, float], ...] | None  # (C, 3); None when no faithful map is known
    rgb_bias: tuple[float, float, float]  # (3,)
    source: str  # where the factors come from
    taesd_repo: str | None = None  # hub repo of the AutoencoderTiny trained for this VAE
    decoder_file: str | None = None  # path of a fitted PreviewDecoder for this VAE


# TAESD weights per VAE (github.com/madebyollin/taesd); taef1 is FLUX.1's.
TAESD_REPOS = {"sd1": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl", "sd3": "madebyollin/taesd3",
               "flux": "madebyollin/taef1"}

# Published factors, from ComfyUI's comfy/latent_formats.py (GPL-3.0 project; numbers only).
SD1 = LatentFormat("sd1", 4, (
    (0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177),
), (0.0, 0.0, 0.0), "ComfyUI latent_formats.SD15", TAESD_REPOS["sd1"])
SDXL = LatentFormat("sdxl", 4, (
    (0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188),
), (0.1084, -0.0175, -0.0011), "ComfyUI latent_formats.SDXL", TAESD_REPOS["sdxl"])
SD3 = LatentFormat("sd3", 16, (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
), (0.2394, 0.2135, 0.1925), "ComfyUI latent_formats.SD3", TAESD_REPOS["sd3"])
FLUX = LatentFormat("flux", 16, (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
), (-0.0329, -0.0718, -0.0851), "ComfyUI latent_formats.Flux", TAESD_REPOS["flux"])

# PixArt-Σ uses the SDXL VAE. Flux's previews see its latents unpacked (B, 16, h, w), as the loop keeps them.
FORMAT_BY_FAMILY: dict[str, LatentFormat] = {"sd": SD1, "sdxl": SDXL, "pixart_sigma": SDXL, "sd3": SD3,
                                             "flux": FLUX}


def load_format_file(path: str | os.PathLike) -> LatentFormat:
    """A fitted format from a model folder's latent_preview.json.

    `"offer_rgb": false` in the file keeps the factors on record but does not offer the linear map (for a VAE
    whose colours a linear map cannot follow); the folder's preview decoder is picked up by latent_format_for.
    """
    data = json.loads(Path(path).read_text())
    factors = tuple(tuple(float(v) for v in row) for row in data["latent_rgb_factors"])
    bias = tuple(float(v) for v in data.get("latent_rgb_bias", (0.0, 0.0, 0.0)))
    if any(len(row) != 3 for row in factors) or len(bias) != 3:
        raise ValueError(f"{path}: latent_rgb_factors must be C rows of 3 numbers and latent_rgb_bias 3 numbers")
    offer = data.get("offer_rgb", True)
    if not isinstance(offer, bool):
        raise ValueError(f"{path}: offer_rgb must be true or false, got {offer!r}")
    name = data.get("name", Path(path).parent.name)
    return LatentFormat(name, len(factors), factors if offer else None, bias, f"fitted ({Path(path).name})")


def latent_format_for(pipe, family: Family | None = None) -> LatentFormat:
    """The latent format of a loaded pipeline: fitted files stored with the model win over published ones.

    A model folder with its own latent_preview.json or preview_decoder.safetensors has its own VAE: it gets
    no published map and no TAESD. When the VAE's channel count does not match the family's published format
    (tiny test models, custom VAEs), the format has no RGB map and no TAESD repo.
    """
    family = family or family_of(pipe)
    folder = Path(pipe.config.get("_name_or_path") or "")
    channels = pipe.vae.config.latent_channels
    fitted = folder / PREVIEW_FILE
    decoder = folder / DECODER_FILE
    own = str(folder) not in ("", ".") and (fitted.is_file() or decoder.is_file())
    if own:
        fmt = load_format_file(fitted) if fitted.is_file() else LatentFormat(
            folder.name, channels, None, (0.0, 0.0, 0.0), "no latent→RGB map for this VAE")
        fmt = replace(fmt, decoder_file=str(decoder) if decoder.is_file() else None)
    else:
        fmt = FORMAT_BY_FAMILY[family.key]
    if fmt.channels != channels:
        return LatentFormat(f"{channels}-channel", channels, None, (0.0, 0.0, 0.0), "no published map for this VAE")
    return fmt


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """One image (3, H, W) in [-1, 1] -> (H, W, 3) uint8, as diffusers' postprocess rounds it."""
    return _to_uint8((image.detach().float().clamp(-1, 1).permute(1, 2, 0).cpu().numpy() + 1.0) / 2.0)


def _cell_colours(preview: np.ndarray, reference: np.ndarray, cell: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Both (H, W, 3) uint8 images averaged over cell × cell blocks -> two (h, w, 3) arrays on [0, 1]."""
    if preview.shape != reference.shape or preview.ndim != 3 or preview.shape[2] != 3:
        raise ValueError(f"{name} needs two (H, W, 3) images of one shape, got {preview.shape} and {reference.shape}")
    h, w = preview.shape[0] // cell, preview.shape[1] // cell

    def pooled(x: np.ndarray) -> np.ndarray:
        return x[:h * cell, :w * cell].astype(np.float64).reshape(h, cell, w, cell, 3).mean(axis=(1, 3)) / 255.0

    return pooled(preview), pooled(reference)


def colour_error(preview: np.ndarray, reference: np.ndarray, cell: int) -> float:
    """Mean |RGB| difference on [0, 1] after averaging both (H, W, 3) images over cell × cell blocks.

    `cell` is the VAE factor, so the comparison is on the latent grid: a preview is judged on the colours it
    shows per latent pixel, not on edges finer than the latents can say anything about.
    """
    pre, ref = _cell_colours(preview, reference, cell, "colour_error")
    return float(np.abs(pre - ref).mean())


OBJECT_THRESHOLD = 0.15  # a latent cell is "object" where its mean colour is this far (sum of |RGB|, [0, 1]) from the background


def object_colour_error(preview: np.ndarray, reference: np.ndarray, cell: int) -> float | None:
    """colour_error on the latent cells where `reference` shows something other than its background (the median
    cell colour): the colours of what is drawn, which a whole-image mean hides when the object is small (a small
    shape covers ~5% of the image). None when the reference shows nothing but background."""
    pre, ref = _cell_colours(preview, reference, cell, "object_colour_error")
    mask = np.abs(ref - np.median(ref.reshape(-1, 3), axis=0)).sum(-1) > OBJECT_THRESHOLD
    return float(np.abs(pre - ref)[mask].mean()) if mask.any() else None


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


# ---- the tiny preview decoder ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewDecoderConfig:
    """Shape of a PreviewDecoder; stored in the weights file's metadata."""

    latent_channels: int = 4  # C of the model's latents
    hidden: int = 32  # channels of every 3×3 convolution
    layers: int = 4  # 3×3 convolutions (receptive field 2·layers + 1 latent cells)
    scale: int = 4  # pixels per latent cell (the VAE factor)


class PreviewDecoder(nn.Module):
    """Model-space latents (B, C, h, w) -> RGB (B, 3, h·s, w·s), roughly in [-1, 1] (clamp to show).

    A few 3×3 convolutions, a global-context bias (the image-mean of the first layer's features, through a
    linear layer, added before the second activation: the VAE's mid-block attention shifts colours image-wide,
    and without it a third of the error was a per-image colour offset) and a 1×1 convolution to an s × s RGB
    patch per latent cell, rearranged by pixel shuffle. A TAESD-like idea (madebyollin/taesd) cut down to the
    ~200k parameters a 16×16×4 latent space needs; fitted by training/fit_preview.py on the model's own latents.
    """

    def __init__(self, config: PreviewDecoderConfig) -> None:
        super().__init__()
        if config.layers < 2:
            raise ValueError(f"PreviewDecoder needs layers >= 2 (the global context enters the second), got {config.layers}")
        self.config = config
        c, h, s = config.latent_channels, config.hidden, config.scale
        self.convs = nn.ModuleList([nn.Conv2d(c if i == 0 else h, h, 3, padding=1) for i in range(config.layers)])
        self.context = nn.Linear(h, h)
        self.to_rgb = nn.Conv2d(h, 3 * s * s, 1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.convs[0](latents))
        x = F.silu(self.convs[1](x) + self.context(x.mean(dim=(2, 3)))[:, :, None, None])
        for conv in self.convs[2:]:
            x = F.silu(conv(x))
        return F.pixel_shuffle(self.to_rgb(x), self.config.scale)


def save_preview_decoder(decoder: PreviewDecoder, path: str | os.PathLike) -> Path:
    """Write fp16 weights with the config as safetensors metadata (one file, nothing to keep in sync)."""
    path = Path(path)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in decoder.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(asdict(decoder.config), sort_keys=True)})
    os.chmod(path, 0o644)  # safetensors writes owner-only files; a model folder is shared
    return path


def load_preview_decoder(path: str | os.PathLike) -> PreviewDecoder:
    """A PreviewDecoder from save_preview_decoder's file, float32 on the CPU, in eval mode."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata; write it with save_preview_decoder")
    decoder = PreviewDecoder(PreviewDecoderConfig(**json.loads(meta["config"])))
    decoder.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return decoder.eval()


# ---- TAESD ---------------------------------------------------------------------------------------------


def cached_taesd(repo: str | None, channels: int) -> Path | None:
    """The local snapshot folder of `repo` when its AutoencoderTiny weights are already in the HF cache and fit
    `channels` latent channels, else None. Never downloads: the weights then load from that folder."""
    if repo is None:
        return None
    config = try_to_load_from_cache(repo, "config.json")
    if not isinstance(config, str):  # None (not cached) or the "known not to exist" sentinel
        return None
    folder = Path(config).parent
    if not any((folder / name).is_file() for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
        return None
    if json.loads(Path(config).read_text()).get("latent_channels", 4) != channels:
        return None
    return folder


# ---- the previewer -------------------------------------------------------------------------------------


def resolve_kind(wanted: str, offered: tuple[str, ...], fast: str) -> str:
    """`wanted` when offered ('fast': the model's fast kind); never a silent fallback to another kind."""
    kind = fast if wanted == "fast" else wanted
    if kind not in offered:
        known = "" if kind in KIND_LABELS else "unknown "
        raise ValueError(f"{known}preview kind {wanted!r} is not offered for this model; choose one of: "
                         f"fast, {', '.join(offered)}")
    return kind


class Previewer:
    """Renders latents of one loaded pipeline with any of the preview strategies it offers.

    decoder: a PreviewDecoder to use instead of the one in the model folder (loaded lazily otherwise).
    taesd: an AutoencoderTiny to use instead of one from the local HF cache (loaded lazily otherwise).
    """

    def __init__(self, pipe, family: Family | None = None, fmt: LatentFormat | None = None,
                 taesd: Any | None = None, decoder: PreviewDecoder | None = None) -> None:
        self.pipe = pipe
        self.family = family or family_of(pipe)
        self.format = fmt or latent_format_for(pipe, self.family)
        self.scale = pipe.vae_scale_factor  # pixels per latent cell
        channels = pipe.vae.config.latent_channels
        for name, module in (("taesd", taesd), ("decoder", decoder)):
            if module is not None and module.config.latent_channels != channels:
                raise ValueError(f"{name} takes {module.config.latent_channels}-channel latents but this model's "
                                 f"VAE makes {channels}")
        self._taesd = taesd
        self._taesd_folder = None if taesd is not None else cached_taesd(self.format.taesd_repo, channels)
        self._decoder = decoder
        self._renderers: dict[str, Callable[[torch.Tensor, bool], np.ndarray]] = {
            "channels": lambda z, upscale: channel_grid(z),
            "rgb": self._rgb,
            "approx": lambda z, upscale: self.approx(z),
            "taesd": lambda z, upscale: self.taesd(z),
            "decode": lambda z, upscale: self.decode(z),
        }

    @property
    def kinds(self) -> tuple[str, ...]:
        """Strategies available for this model, cheapest first."""
        offered = {
            "channels": True,
            "rgb": self.format.rgb_factors is not None,
            "approx": self._decoder is not None or self.format.decoder_file is not None,
            "taesd": self._taesd is not None or self._taesd_folder is not None,
            "decode": True,
        }
        return tuple(k for k in PREVIEW_KINDS if offered[k])

    @property
    def fast_kind(self) -> str:
        """The cheapest colour preview this model offers short of the full decode ('channels' when none)."""
        return next((k for k in ("approx", "taesd", "rgb") if k in self.kinds), "channels")  # TAESD beats the linear map

    def resolve(self, wanted: str) -> str:
        """A kind this model offers: `wanted` itself, or its fast kind for 'fast'; else a ValueError listing them."""
        return resolve_kind(wanted, self.kinds, self.fast_kind)

    def label(self, kind: str) -> str:
        """Human label of an offered kind, for the UI."""
        self._check(kind)
        return KIND_LABELS[kind]

    def _check(self, kind: str) -> None:
        if kind not in self.kinds:
            known = "" if kind in KIND_LABELS else "unknown "
            raise ValueError(f"{known}preview kind {kind!r} is not offered for this model; choose one of: "
                             f"{', '.join(self.kinds)}")

    def render(self, kind: str, latents: torch.Tensor, upscale: bool = True) -> np.ndarray:
        """uint8 image of the first latent in the batch; `upscale` brings latent-resolution previews to pixel size."""
        self._check(kind)
        return self._renderers[kind](latents, upscale)

    def _rgb(self, latents: torch.Tensor, upscale: bool) -> np.ndarray:
        rgb = latent_rgb(latents, self.format)
        return rgb.repeat(self.scale, 0).repeat(self.scale, 1) if upscale else rgb

    @torch.no_grad()
    def approx(self, latents: torch.Tensor) -> np.ndarray:
        """The tiny preview decoder on the first latent (on the CPU: it costs ~2 ms) -> (H, W, 3) uint8."""
        if self._decoder is None:
            if self.format.decoder_file is None:
                raise ValueError(f"no preview decoder for the {self.format.name} latent format")
            self._decoder = load_preview_decoder(self.format.decoder_file)
        z = latents[:1].detach().float().cpu()
        return image_to_uint8(self._decoder(z)[0])

    @torch.no_grad()
    def taesd(self, latents: torch.Tensor) -> np.ndarray:
        """TAESD decode of the first latent -> (H, W, 3) uint8.

        TAESD decodes model-space latents directly (madebyollin/taesd#3: "TAESD directly converts SD(XL) latents
        into RGB"), which is why its diffusers config has scaling_factor 1.0 and shift_factor 0.0; the latents
        are unscaled by those anyway, exactly as a diffusers pipeline does with an AutoencoderTiny as its VAE.
        diffusers' DecoderTiny soft-clamps its input to ±3 (tanh(x/3)·3) and returns images in [-1, 1].
        """
        if self._taesd is None:
            if self._taesd_folder is None:
                raise ValueError(f"no TAESD weights in the local cache for the {self.format.name} latent format")
            vae = self.pipe.vae
            self._taesd = AutoencoderTiny.from_pretrained(self._taesd_folder).to(
                device=vae.device, dtype=vae.dtype).eval()
        tiny = self._taesd
        cfg = tiny.config
        z = latents[:1].to(device=tiny.device, dtype=tiny.dtype)
        z = z / cfg.scaling_factor + getattr(cfg, "shift_factor", 0.0)
        return image_to_uint8(tiny.decode(z, return_dict=False)[0][0])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Full VAE decode of the first latent -> (H, W, 3) uint8."""
        z = latents[:1].to(self.pipe.vae.device)
        image = self.family.decode(self.pipe, z)
        return image_to_uint8(image[0])
