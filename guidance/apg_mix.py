"""CFG for the first steps, then adaptive projected guidance (APG: Sadat et al. 2024, arXiv 2410.02416), as
HunyuanImage-2.1 runs it; diffusers' AdaptiveProjectedMixGuidance."""

from __future__ import annotations

import math

import torch

from guidance.apg import normalized_update
from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions
from guidance.cfg import cfg

# diffusers' AdaptiveProjectedMixGuidance defaults
APG_SCALE = 10.0
MOMENTUM = -0.5
NORM_THRESHOLD = 10.0
ETA = 0.0
START_STEP = 5


class APGMix(GuidanceMethod):
    """Steps i ≤ start_step: CFG at scale s; later steps: APG at its own scale s_apg.

      Δ̄ ← (ε_c − ε_u) + β·Δ̄ on every guided step (CFG ones too, so APG starts with a warm momentum buffer)
      i ≤ start_step:  ε̃ = ε_u + s·(ε_c − ε_u)
      i > start_step:  Δ = Δ̄ clipped to ‖Δ‖ ≤ r, Δ̂ = Δ⊥ + η·Δ∥ (w.r.t. ε_c),  ε̃ = ε_u + s_apg·Δ̂

    The buffer lives on this instance (one per run), as diffusers' MomentumBuffer made at step 0.
    """

    def __init__(
        self,
        guidance_scale: float,
        adaptive_projected_guidance_scale: float = APG_SCALE,
        adaptive_projected_guidance_momentum: float = MOMENTUM,
        adaptive_projected_guidance_rescale: float = NORM_THRESHOLD,
        eta: float = ETA,
        adaptive_projected_guidance_start_step: int = START_STEP,
    ) -> None:
        self.guidance_scale = guidance_scale
        self.apg_scale = adaptive_projected_guidance_scale
        self.momentum = adaptive_projected_guidance_momentum
        self.norm_threshold = adaptive_projected_guidance_rescale
        self.eta = eta
        self.start_step = int(adaptive_projected_guidance_start_step)
        self.running_average: torch.Tensor | float = 0.0  # Δ̄

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred_cond, pred_uncond = preds.cond, preds.uncond
        self.running_average = (pred_cond - pred_uncond) + self.momentum * self.running_average
        if ctx.step <= self.start_step or math.isclose(self.apg_scale, 1.0):  # as diffusers: s_apg = 1 is off
            return GuidanceOutput(cfg(pred_cond, pred_uncond, self.guidance_scale), self.guidance_scale)
        update = normalized_update(self.running_average, pred_cond, self.eta, self.norm_threshold)
        return GuidanceOutput(pred_uncond + self.apg_scale * update, self.apg_scale)
