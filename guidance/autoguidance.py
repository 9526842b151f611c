"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", arXiv 2406.02507);
diffusers' AutoGuidance, whose weaker model is the same model with some blocks dropped.

    D̃ = D_weak + s (D_c − D_weak)

D_weak runs with the prompt (the paper guides D(x|c) with a weaker D₀(x|c)) through the family's guidance blocks
skipped. diffusers 0.42.1 runs its weak pass on its second condition (the negative prompt) and combines the two
exactly as here (forward(pred_cond, pred_uncond=D_weak)); it also offers partial dropout of the blocks (random at
run time), where this method drops them whole (diffusers' dropout=1.0). No unconditional pass: the scale ≤ 1 turns
it off as it turns CFG off.
"""

from __future__ import annotations

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Perturbation, Predictions
from guidance.cfg import cfg


class AutoGuidance(GuidanceMethod):
    """CFG-shaped guidance away from the model with its guidance blocks skipped, instead of the unconditional one."""

    uses = ("cond", "perturbed")
    perturbation = Perturbation("skip_blocks")

    def __init__(self, guidance_scale: float) -> None:
        self.guidance_scale = guidance_scale

    def needs(self, ctx: GuidanceContext, cfg: bool) -> tuple[str, ...]:
        return ("cond", "perturbed") if cfg else ("cond",)

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        return GuidanceOutput(cfg(preds.cond, preds.perturbed, self.guidance_scale), self.guidance_scale)
