"""Frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the Frequency Domain Enables High-Fidelity
Sampling at Low CFG Scales", arXiv 2506.19713, Algorithm 2); diffusers' FrequencyDecoupledGuidance."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions

GUIDANCE_SCALE_LOW = 5.0  # paper Table 8 (SD-XL): w_low = 5 with w_high = 10 (diffusers' default [10, 5])
PARALLEL_WEIGHT = 1.0  # 1 = the plain CFG update in each band

# Burt & Adelson's 5×5 binomial kernel, as kornia's pyramid functions use it.
_KERNEL_1D = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """5×5 binomial blur per channel with reflected borders (kornia filter2d(x, kernel, 'reflect'))."""
    k1 = torch.tensor(_KERNEL_1D, dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then bilinear down to half size (kornia.geometry.pyrdown)."""
    return F.interpolate(_blur(x), size=(x.shape[2] // 2, x.shape[3] // 2), mode="bilinear", align_corners=False)


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """Bilinear up to double size, then blur (kornia.geometry.pyrup)."""
    return _blur(F.interpolate(x, size=(x.shape[2] * 2, x.shape[3] * 2), mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """(B, C, H, W) -> [band 0 (finest), …, Gaussian level levels−1 (coarsest)]; H, W divisible by 2^(levels−1).

    As kornia's build_laplacian_pyramid on such sizes (kornia pads other sizes to a power of two, which changes the
    bands' shapes; here they are refused)."""
    stride = 1 << (levels - 1)
    if x.ndim != 4 or x.shape[2] % stride or x.shape[3] % stride:
        raise ValueError(f"frequency-decoupled guidance needs (B, C, H, W) predictions with H and W divisible by "
                         f"{stride}; got shape {tuple(x.shape)}")
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(pyr_down(gaussian[-1]))
    return [gaussian[i] - pyr_up(gaussian[i + 1]) for i in range(levels - 1)] + [gaussian[-1]]


def image_from_pyramid(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """Invert laplacian_pyramid: coarsest level, then up-blur and add each finer band (paper Algorithm 2)."""
    x = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        x = pyr_up(x) + band
    return x


# Adapted from diffusers 0.42.1, guiders/frequency_decoupled_guidance.project
def project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v0 parallel to v1, v0 orthogonal to v1) per image, computed in float64."""
    dim = list(range(1, v0.ndim))
    dtype, device = v0.dtype, v0.device
    if device.type in {"mps", "npu"}:  # no float64 there: project on the CPU (as guidance/apg.py)
        v0, v1 = v0.cpu(), v1.cpu()
    v0, v1 = v0.double(), F.normalize(v1.double(), dim=dim)
    parallel = (v0 * v1).sum(dim=dim, keepdim=True) * v1
    return parallel.to(device=device, dtype=dtype), (v0 - parallel).to(device=device, dtype=dtype)


def fdg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scales: tuple[float, ...],
        parallel_weight: float = PARALLEL_WEIGHT) -> torch.Tensor:
    """CFG per Laplacian band k (finest first): ε̃_k = ε_u,k + w_k·Δ_k, Δ_k = w_∥·Δ∥ + Δ⊥ (w.r.t. ε_c,k); then invert.

    A band whose w_k is 1 keeps ε_c,k, as diffusers does. A latent whose sides the pyramid cannot halve is padded by
    reflection to the next size it can, and the result cropped back (diffusers' guider fails on those sizes)."""
    height, width = pred_cond.shape[-2:]
    stride = 1 << (len(guidance_scales) - 1)
    pad = (0, -width % stride, 0, -height % stride)
    if any(pad):
        guided = fdg(F.pad(pred_cond, pad, mode="reflect"), F.pad(pred_uncond, pad, mode="reflect"), guidance_scales,
                     parallel_weight)
        return guided[..., :height, :width]
    cond_bands = laplacian_pyramid(pred_cond, len(guidance_scales))
    uncond_bands = laplacian_pyramid(pred_uncond, len(guidance_scales))
    guided = []
    for w, c, u in zip(guidance_scales, cond_bands, uncond_bands):
        if math.isclose(w, 1.0):
            guided.append(c)
            continue
        shift = c - u
        if not math.isclose(parallel_weight, 1.0):
            parallel, orthogonal = project(shift, c)
            shift = parallel_weight * parallel + orthogonal
        guided.append(u + w * shift)
    return image_from_pyramid(guided)


class FDG(GuidanceMethod):
    """CFG at scale s on the high-frequency band and guidance_scale_low on the low one (a 2-level Laplacian pyramid)."""

    def __init__(self, guidance_scale: float, guidance_scale_low: float = GUIDANCE_SCALE_LOW,
                 parallel_weight: float = PARALLEL_WEIGHT) -> None:
        self.guidance_scales = (guidance_scale, guidance_scale_low)
        self.parallel_weight = parallel_weight

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred = fdg(preds.cond, preds.uncond, self.guidance_scales, self.parallel_weight)
        return GuidanceOutput(pred, self.guidance_scales[0])
