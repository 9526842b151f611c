"""MAMBO-G, magnitude-aware guidance ("Magnitude-Aware Mitigation for Boosted Guidance", arXiv 2508.03442);
diffusers' MagnitudeAwareGuidance."""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions

ALPHA = 8.0  # diffusers' default


# Adapted from diffusers 0.42.1, guiders/magnitude_aware_guidance.mambo_guidance. Its torch.norm over all but the batch
# dimension is a Frobenius norm that torch 2.13 refuses for more than two dimensions (a (B, C, H, W) latent raises);
# the L2 norm over them, written as vector_norm, is the same number and takes any shape.
def mambo_scale(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float, alpha: float) -> torch.Tensor:
    """s' = 1 + (s − 1)·exp(−α·‖ε_c − ε_u‖ / ‖ε_u‖) per image, (B, C, H, W) -> (B, 1, 1, 1)."""
    dim = list(range(1, pred_cond.ndim))
    diff_norm = torch.linalg.vector_norm(pred_cond - pred_uncond, dim=dim, keepdim=True)
    ratio = diff_norm / torch.linalg.vector_norm(pred_uncond, dim=dim, keepdim=True)
    return 1.0 + (guidance_scale - 1.0) * torch.exp(-alpha * ratio)


def mambo(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float, alpha: float) -> torch.Tensor:
    """ε̃ = ε_u + s'(ε_c − ε_u): CFG whose scale shrinks where the update is large next to ε_u."""
    return pred_uncond + mambo_scale(pred_cond, pred_uncond, guidance_scale, alpha) * (pred_cond - pred_uncond)


class MamboG(GuidanceMethod):
    """CFG with the per-image scale damped by the update's relative magnitude; effective_scale is the batch mean s'."""

    def __init__(self, guidance_scale: float, alpha: float = ALPHA) -> None:
        self.guidance_scale = guidance_scale
        self.alpha = alpha

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        scale = mambo_scale(preds.cond, preds.uncond, self.guidance_scale, self.alpha)
        pred = preds.uncond + scale * (preds.cond - preds.uncond)
        return GuidanceOutput(pred, float(scale.float().mean()))
