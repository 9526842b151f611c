"""Tangential classifier-free guidance (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free Guidance",
arXiv 2503.18137)."""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions


# Adapted from diffusers 0.42.1, guiders/tangential_classifier_free_guidance.normalized_guidance
def tangential_cfg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε̃ = ε̂_u + s (ε_c − ε̂_u), ε̂_u = ε_u projected on the first right-singular vector of [ε_c; ε_u].

    Per image: the SVD of the 2 × (C·H·W) matrix [ε_c; ε_u] (float32) gives the direction both predictions share;
    ε_u's component along the second (the "tangential" one, mostly noise) is dropped before CFG.
    """
    cond_dtype = pred_cond.dtype
    preds = torch.stack([pred_cond, pred_uncond], dim=1).float().flatten(2)  # (B, 2, C·H·W)
    _, _, vh = torch.linalg.svd(preds, full_matrices=False)
    vh_first = vh.clone()
    vh_first[:, 1] = 0
    uncond_flat = pred_uncond.reshape(pred_uncond.size(0), 1, -1).float()
    projected = torch.matmul(torch.matmul(uncond_flat, vh.transpose(-2, -1)), vh_first)
    pred_uncond = projected.reshape(pred_uncond.shape).to(cond_dtype)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


class TCFG(GuidanceMethod):
    """CFG against the unconditional prediction stripped of its tangential (second singular) component."""

    def __init__(self, guidance_scale: float) -> None:
        self.guidance_scale = guidance_scale

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        return GuidanceOutput(tangential_cfg(preds.cond, preds.uncond, self.guidance_scale), self.guidance_scale)
