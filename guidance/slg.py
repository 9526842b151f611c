"""Skip-layer guidance (Stability AI, SD3.5 reference code https://github.com/Stability-AI/sd3.5; in the line of
Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv 2406.02507); diffusers'
SkipLayerGuidance.

A third pass runs the denoiser with the prompt while the family's guidance blocks are skipped (each returns its
input); guidance pushes away from that degraded prediction inside a step window:

    ε̃ = ε_u + s (ε_c − ε_u) + s_slg (ε_c − ε_skip)        (with CFG)
    ε̃ = ε_skip + s_slg (ε_c − ε_skip)                     (without CFG, as diffusers)

The skip pass runs on steps i with int(start·N) < i < int(stop·N) (diffusers' window: strict at both ends).
"""

from __future__ import annotations

import math

import torch

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Perturbation, Predictions

# diffusers' defaults, StabilityAI's recommendation for SD3.5 Medium
SCALE = 2.8
START = 0.01
STOP = 0.2


def perturbed_guidance(pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None, pred_perturbed: torch.Tensor | None,
                       guidance_scale: float, perturbed_scale: float) -> torch.Tensor:
    """CFG plus a push away from a perturbed prediction, each term only when its prediction is given; written in
    diffusers' order (SkipLayerGuidance / SmoothedEnergyGuidance.forward) so results match bit for bit."""
    if pred_uncond is None and pred_perturbed is None:
        return pred_cond
    if pred_uncond is None:
        return pred_perturbed + perturbed_scale * (pred_cond - pred_perturbed)
    if pred_perturbed is None:
        return pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond) + perturbed_scale * (pred_cond - pred_perturbed)


def in_window(ctx: GuidanceContext, start: float, stop: float) -> bool:
    """int(start·N) < step < int(stop·N), diffusers' _is_slg_enabled / _is_seg_enabled window."""
    return int(start * ctx.num_steps) < ctx.step < int(stop * ctx.num_steps)


class WindowedPerturbedGuidance(GuidanceMethod):
    """CFG plus a perturbed pass inside a step window, at scale `perturbed_scale` (0 turns the pass off)."""

    uses = ("uncond", "cond", "perturbed")

    def __init__(self, guidance_scale: float, perturbed_scale: float, start: float, stop: float) -> None:
        self.guidance_scale = guidance_scale
        self.perturbed_scale = perturbed_scale
        self.start = start
        self.stop = stop

    def needs(self, ctx: GuidanceContext, cfg: bool) -> tuple[str, ...]:
        on = in_window(ctx, self.start, self.stop) and not math.isclose(self.perturbed_scale, 0.0)
        return (("uncond",) if cfg else ()) + ("cond",) + (("perturbed",) if on else ())

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        pred = perturbed_guidance(preds.cond, preds.uncond, preds.perturbed, self.guidance_scale, self.perturbed_scale)
        return GuidanceOutput(pred, self.guidance_scale if preds.uncond is not None else 1.0)


class SLG(WindowedPerturbedGuidance):
    """CFG plus skip-layer guidance at scale skip_layer_guidance_scale inside its step window."""

    perturbation = Perturbation("skip_blocks")

    def __init__(self, guidance_scale: float, skip_layer_guidance_scale: float = SCALE,
                 skip_layer_guidance_start: float = START, skip_layer_guidance_stop: float = STOP) -> None:
        super().__init__(guidance_scale, skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop)


def check_window(params: dict[str, float], start: str, stop: str) -> None:
    """start <= stop, as diffusers' SkipLayerGuidance requires."""
    if params[start] > params[stop]:
        raise ValueError(f"{start} ({params[start]:g}) must not be after {stop} ({params[stop]:g})")
