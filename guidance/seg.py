"""Smoothed energy guidance (Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy
Curvature of Attention", arXiv 2408.00760); diffusers' SmoothedEnergyGuidance.

A third pass runs with the prompt while the self-attention *query* of the family's guidance blocks is blurred over
the image plane by a Gaussian of σ tokens (σ → ∞: every query is the mean query, a uniform attention map), which
flattens the attention energy landscape; guidance pushes away from it as SLG does:

    ε̃ = ε_u + s (ε_c − ε_u) + s_seg (ε_c − ε_seg)        (ε_seg + s_seg (ε_c − ε_seg) without CFG)

on steps int(start·N) < i < int(stop·N). The blur itself is `blur_query` below; the family installs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from guidance.base import Perturbation
from guidance.slg import WindowedPerturbedGuidance

# diffusers' defaults: scale 3, infinite blur, the whole run. Any σ above the threshold 9999 is infinite blur; diffusers
# writes it 9999999, here 10000 so that a slider from 0.01 to it stays usable.
SCALE = 3.0
BLUR_SIGMA = 10000.0
BLUR_THRESHOLD_INF = 9999.0


# Adapted from diffusers 0.42.1, hooks/smoothed_energy_guidance_utils._gaussian_blur_2d (from the SEG authors'
# pipeline_seg.py), with its two branches the way the paper and the authors' code have them: diffusers 0.42.1 takes
# the mean for a σ *below* the threshold and blurs with a clipped kernel above it (tests/test_guiders.py checks
# each branch against the diffusers branch that computes it).
def blur_query(query: torch.Tensor, sigma: float, threshold_inf: float = BLUR_THRESHOLD_INF) -> torch.Tensor:
    """Query (B, L, D) -> same, its first ⌊√L⌋² tokens (a square image) blurred by a Gaussian of σ tokens, with
    reflected borders; σ > threshold_inf replaces them by their mean. Out of place."""
    batch, seq_len, dim = query.shape
    side = int(math.sqrt(seq_len))
    square = side * side
    plane = query[:, :square, :].permute(0, 2, 1).reshape(batch, dim, side, side)
    if sigma > threshold_inf:
        plane = plane.mean(dim=(-2, -1), keepdim=True).expand_as(plane)
    else:
        kernel_size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        kernel_size = min(kernel_size, side - (side % 2 - 1))
        half = (kernel_size - 1) / 2
        x = torch.linspace(-half, half, steps=kernel_size)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        kernel1d = (pdf / pdf.sum()).to(query)
        kernel2d = torch.matmul(kernel1d[:, None], kernel1d[None, :]).expand(dim, 1, kernel_size, kernel_size)
        pad = kernel_size // 2
        plane = F.conv2d(F.pad(plane, [pad, pad, pad, pad], mode="reflect"), kernel2d, groups=dim)
    blurred = plane.reshape(batch, dim, square).permute(0, 2, 1)
    return torch.cat([blurred, query[:, square:, :]], dim=1) if square < seq_len else blurred.contiguous()


class SEG(WindowedPerturbedGuidance):
    """CFG plus smoothed energy guidance at scale seg_guidance_scale, query blur σ = seg_blur_sigma."""

    def __init__(self, guidance_scale: float, seg_guidance_scale: float = SCALE, seg_blur_sigma: float = BLUR_SIGMA,
                 seg_guidance_start: float = 0.0, seg_guidance_stop: float = 1.0) -> None:
        super().__init__(guidance_scale, seg_guidance_scale, seg_guidance_start, seg_guidance_stop)
        self.perturbation = Perturbation("blur_query", blur_sigma=seg_blur_sigma, blur_threshold_inf=BLUR_THRESHOLD_INF)
