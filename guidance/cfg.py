"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598)."""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions


def cfg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε̃ = ε_u + s (ε_c − ε_u); written as diffusers writes it so results match bit for bit."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


class CFG(GuidanceMethod):
    """Plain CFG at a fixed scale."""

    def __init__(self, guidance_scale: float) -> None:
        self.guidance_scale = guidance_scale

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred_cond, pred_uncond = preds.cond, preds.uncond
        return GuidanceOutput(cfg(pred_cond, pred_uncond, self.guidance_scale), self.guidance_scale)
