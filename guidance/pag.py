"""Perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", arXiv 2403.17377).

A third pass runs the denoiser with chosen self-attention maps replaced by the identity (each token attends
only to itself), which destroys structure; guidance pushes away from that degraded prediction:

    ε = ε_u + s (ε_c − ε_u) + s_pag (ε_c − ε_ptb)        (with CFG, s > 1)
    ε = ε_c + s_pag (ε_c − ε_ptb)                         (without CFG)

Adaptive scale as diffusers' PAGMixin: s_pag(t) = max(s_pag − a · (1000 − t), 0) when a > 0.
The perturbed pass itself (which layers, which attention processor) belongs to the model family, in
pipelines/families.py; this file only combines the three predictions.
"""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Perturbation, Predictions


def pag_scale_at(pag_scale: float, pag_adaptive_scale: float, timestep: float) -> float:
    """s_pag at timestep t: constant, or decaying linearly from t = 1000 when adaptive (diffusers' _get_pag_scale)."""
    if pag_adaptive_scale > 0:
        return max(pag_scale - pag_adaptive_scale * (1000 - timestep), 0.0)
    return pag_scale


def pag(
    pred_cond: torch.Tensor,
    pred_uncond: torch.Tensor | None,
    pred_perturbed: torch.Tensor,
    guidance_scale: float,
    pag_scale: float,
) -> torch.Tensor:
    """The PAG combination, written in diffusers' order so results match bit for bit."""
    if pred_uncond is None:
        return pred_cond + pag_scale * (pred_cond - pred_perturbed)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond) + pag_scale * (pred_cond - pred_perturbed)


class PAG(GuidanceMethod):
    """CFG plus perturbed-attention guidance at scale pag_scale (optionally adaptive in t)."""

    uses = ("uncond", "cond", "perturbed")
    perturbation = Perturbation("identity_attention")

    def __init__(self, guidance_scale: float, pag_scale: float = 3.0, pag_adaptive_scale: float = 0.0) -> None:
        self.guidance_scale = guidance_scale
        self.pag_scale = pag_scale
        self.pag_adaptive_scale = pag_adaptive_scale

    def needs(self, ctx: GuidanceContext, cfg: bool) -> tuple[str, ...]:
        return ("uncond", "cond", "perturbed") if cfg else ("cond", "perturbed")

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        s_pag = pag_scale_at(self.pag_scale, self.pag_adaptive_scale, ctx.timestep)
        pred = pag(preds.cond, preds.uncond, preds.perturbed, self.guidance_scale, s_pag)
        return GuidanceOutput(pred, self.guidance_scale if preds.uncond is not None else 1.0)
