"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
Scales in Diffusion Models", arXiv 2410.02416, Algorithm 1)."""

from __future__ import annotations

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions

# Paper Table 10, SD-XL row (also the values of diffusers' first APG PR, #9626): η = 0, r = 15, β = −0.5.
ETA = 0.0
NORM_THRESHOLD = 15.0
MOMENTUM = -0.5


# Adapted from diffusers 0.42.1, guiders/adaptive_projected_guidance.normalized_guidance (norm over all but dim 0)
def normalized_update(diff: torch.Tensor, pred_cond: torch.Tensor, eta: float, norm_threshold: float) -> torch.Tensor:
    """Δ̂ = Δ∥·η + Δ⊥ with Δ = diff (B, C, H, W) first clipped to ‖Δ‖ ≤ r, ∥/⊥ taken w.r.t. pred_cond per image."""
    dim = list(range(1, diff.ndim))
    if norm_threshold > 0:
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / diff.norm(p=2, dim=dim, keepdim=True))
    # The projection runs in float64 for accuracy (as in the paper's code); MPS/NPU have no float64, so use the CPU.
    if diff.device.type in {"mps", "npu"}:
        v0, v1 = diff.cpu().double(), pred_cond.cpu().double()
    else:
        v0, v1 = diff.double(), pred_cond.double()
    v1 = torch.nn.functional.normalize(v1, dim=dim)
    v0_parallel = (v0 * v1).sum(dim=dim, keepdim=True) * v1
    v0_orthogonal = v0 - v0_parallel
    diff_parallel = v0_parallel.to(device=diff.device, dtype=diff.dtype)
    diff_orthogonal = v0_orthogonal.to(device=diff.device, dtype=diff.dtype)
    return diff_orthogonal + eta * diff_parallel


class APG(GuidanceMethod):
    """CFG whose update is norm-clipped, stripped of (part of) its component parallel to D_c, and given momentum.

    Per step, with Δ = D_c − D_u (paper Algorithm 1):
      1. momentum:  Δ̄ ← Δ + β·Δ̄  (Δ̄ = 0 at the first guided step; β < 0 pushes away from past updates), Δ := Δ̄
      2. threshold: Δ ← Δ · min(1, r/‖Δ‖)  (r = norm_threshold; 0 disables; ‖·‖ over (C, H, W) per image)
      3. project:   Δ̂ = Δ⊥ + η·Δ∥, parallel/orthogonal to D_c
      4. combine:   diffusers (paper_form=0): D̃ = D_u + s·Δ̂;   paper (paper_form=1): D̃ = D_c + (s − 1)·Δ̂

    The forms differ by Δ̂ − (D_c − D_u) (diffusers minus paper), which is 0 at η = 1, β = 0 with r not reached (both
    are then plain CFG) and (η − 1)·Δ∥ without momentum or clipping: at η = 0 diffusers' form also removes the
    parallel part of D_c − D_u that the paper keeps at weight 1. The paper form is
    diffusers' use_original_formulation=True with scale s − 1 (diffusers writes that form as D_c + s·Δ̂). Defaults
    follow the paper's SD-XL setting; diffusers' AdaptiveProjectedGuidance defaults differ (η = 1, no momentum,
    r = 15, its `adaptive_projected_guidance_rescale`). β = 0 is diffusers' momentum=None, bit for bit.

    The momentum buffer lives on this instance (one per run) and advances only on steps where the loop calls it,
    as diffusers' buffer advances only on steps where APG is enabled. r is in prediction units summed over the
    whole latent, so its effect depends on resolution and channel count.
    """

    def __init__(
        self,
        guidance_scale: float,
        eta: float = ETA,
        norm_threshold: float = NORM_THRESHOLD,
        momentum: float = MOMENTUM,
        paper_form: int = 0,
    ) -> None:
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.norm_threshold = norm_threshold
        self.momentum = momentum
        self.paper_form = bool(paper_form)
        self.running_average: torch.Tensor | float = 0.0  # Δ̄, the momentum buffer

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred_cond, pred_uncond = preds.cond, preds.uncond
        diff = pred_cond - pred_uncond
        if self.momentum != 0.0:
            self.running_average = diff + self.momentum * self.running_average
            diff = self.running_average
        update = normalized_update(diff, pred_cond, self.eta, self.norm_threshold)
        if self.paper_form:
            pred = pred_cond + (self.guidance_scale - 1.0) * update
        else:
            pred = pred_uncond + self.guidance_scale * update
        return GuidanceOutput(pred, self.guidance_scale)
