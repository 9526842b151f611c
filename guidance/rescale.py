"""CFG with std rescaling (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
arXiv 2305.08891, section 3.4)."""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions
from guidance.cfg import cfg


# Adapted from diffusers 0.42.1, pipeline_stable_diffusion.rescale_noise_cfg
def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """x = φ · x_cfg·σ(ε_c)/σ(x_cfg) + (1 − φ) · x_cfg, σ over all but the batch dimension."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


class Rescale(GuidanceMethod):
    """CFG, then rescale toward the conditional prediction's std by φ = guidance_rescale."""

    def __init__(self, guidance_scale: float, guidance_rescale: float = 0.7) -> None:
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred_cond, pred_uncond = preds.cond, preds.uncond
        pred = cfg(pred_cond, pred_uncond, self.guidance_scale)
        if self.guidance_rescale > 0.0:  # diffusers skips the rescale at φ = 0; so do we, bit for bit
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuidanceOutput(pred, self.guidance_scale)
