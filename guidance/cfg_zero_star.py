"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models",
arXiv 2503.18886): an optimized scale on the unconditional prediction plus zeroed first steps."""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions

# Zeroed first steps. Flow models: diffusers' ClassifierFreeZeroStarGuidance default, 1 (its docstring cites the
# paper's advice: the first ~4% of steps). ε / v / sample models: 0, because there a zero prediction is not "stay
# put" (see CFGZeroStar): one zeroed step on the embedded ε model turns a red circle into coloured noise.
ZERO_INIT_STEPS = 0
ZERO_INIT_STEPS_FLOW = 1


# Adapted from diffusers 0.42.1, guiders/classifier_free_zero_star_guidance.cfg_zero_star_scale
def cfg_zero_star_scale(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """s* = ⟨v_c, v_u⟩ / (‖v_u‖² + eps) per image, in float32; (B, C, H, W) -> (B, 1, 1, 1) in the input dtype."""
    cond, uncond = pred_cond.flatten(1).float(), pred_uncond.flatten(1).float()
    dot_product = torch.sum(cond * uncond, dim=1, keepdim=True)
    squared_norm = torch.sum(uncond**2, dim=1, keepdim=True) + eps
    scale = (dot_product / squared_norm).to(dtype=pred_cond.dtype)
    return scale.view(-1, *(1,) * (pred_cond.ndim - 1))


class CFGZeroStar(GuidanceMethod):
    """v = s*·v_u + s(v_c − s*·v_u) (diffusers' form), v = 0 for the first zero_init_steps steps.

    s* = argmin_s ‖v_c − s·v_u‖², per image. The paper writes the guided velocity
    as (1 − w)·s*·v_u + w·v_c, which is this formula with w = s. Zero-init (paper section 4.2) is for flow
    matching, where a zero velocity leaves x_t in place. A zero ε or v means something else: x̂0 = x_t/α_t (ε) or
    α_t·x_t (v), i.e. "the noise is the image", which a solver then carries to the end as coloured noise. So the
    registry's default is ZERO_INIT_STEPS_FLOW for flow models and 0 otherwise; an explicit zero_init_steps is
    applied to any model, as diffusers' guider applies it.
    zero_init_steps counts zeroed steps, as in diffusers' guider; diffusers' Helios pipeline instead zeroes steps
    i <= zero_steps (k + 1 steps for zero_steps=k), and its use_zero_init=False is zero_init_steps=0 here.

    effective_scale: 0.0 on zeroed steps; otherwise 1 + (s − 1)·s̄*, with s̄* the batch mean of s* — the CFG
    scale w whose output w·v_c + (1 − w)·v_u pulls away from v_u as hard, since ours is s·v_c + (1 − s)·s*·v_u.
    It equals s when s* = 1 and 1.0 when s* = 0.

    The loop runs both passes on zeroed steps (contract: a cond-only step returns v_c, not 0), as diffusers does,
    and never calls guidance at guidance_scale ≤ 1, so zero-init then does not happen either.
    """

    def __init__(self, guidance_scale: float, zero_init_steps: int = ZERO_INIT_STEPS) -> None:
        self.guidance_scale = guidance_scale
        self.zero_init_steps = int(zero_init_steps)

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred_cond, pred_uncond = preds.cond, preds.uncond
        if ctx.step < self.zero_init_steps:
            return GuidanceOutput(torch.zeros_like(pred_cond), 0.0)
        alpha = cfg_zero_star_scale(pred_cond, pred_uncond)
        pred_uncond = pred_uncond * alpha
        pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        effective_scale = 1.0 + (self.guidance_scale - 1.0) * alpha.float().mean().item()
        return GuidanceOutput(pred, effective_scale)
