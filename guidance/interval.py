"""Guidance in a limited interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
Sample and Distribution Quality in Diffusion Models", arXiv 2404.07724)."""

from __future__ import annotations

from guidance.base import GuidanceContext, GuidanceMethod, GuidanceOutput, Predictions
from guidance.cfg import cfg

# Paper, SD-XL (k-diffusion σ): guidance on for σ ∈ (0.28, 5.42]. EDM2 ImageNet-512 models use narrower intervals.
SIGMA_LO = 0.28
SIGMA_HI = 5.42
# Largest σ a request may name: "no upper bound" in practice (SD's σ_max ≈ 14.6, flow σ ≤ 1).
SIGMA_MAX = 1000.0


def in_step_range(step: int, num_steps: int, start: float, stop: float) -> bool:
    """int(start·N) ≤ step < int(stop·N): diffusers' BaseGuidance start/stop rule (e.g. guiders' _is_cfg_enabled)."""
    return int(start * num_steps) <= step < int(stop * num_steps)


def in_interval(ctx: GuidanceContext, sigma_lo: float, sigma_hi: float, start: float, stop: float) -> bool:
    """Whether guidance is on at this step: sigma_lo ≤ σ ≤ sigma_hi and the step lies in [start, stop) of the run."""
    if not in_step_range(ctx.step, ctx.num_steps, start, stop):
        return False
    if sigma_lo <= 0.0 and sigma_hi >= SIGMA_MAX:  # σ window is the whole axis: no σ needed
        return True
    if ctx.sigma is None:
        raise ValueError(
            "interval: sigma_lo/sigma_hi need the step's sigma, which this scheduler does not report; "
            f"use start/stop instead (sigma_lo=0, sigma_hi={SIGMA_MAX:g} turn the σ window off)"
        )
    return sigma_lo <= ctx.sigma <= sigma_hi


class Interval(GuidanceMethod):
    """CFG at scale s while σ ∈ [sigma_lo, sigma_hi] and step ∈ [start, stop) of the run; cond-only elsewhere.

    D̃ = D_u + s(D_c − D_u) inside the interval, D̃ = D_c outside (the paper's interval is half-open,
    (σ_lo, σ_hi], which differs from this closed one only on the boundary). Outside, needs() leaves out "uncond" so the
    loop skips the unconditional pass, and effective_scale is 1.0.

    Both windows must hold. σ is in the units the loop reports: k-diffusion σ for ε/v models (the paper's units;
    SD-XL default (0.28, 5.42]), flow σ ∈ [0, 1] for flow models, where the same interval reads
    σ_flow = σ_k / (1 + σ_k), i.e. about [0.22, 0.84]. start/stop are fractions of the run with diffusers'
    guider rule int(start·N) ≤ step < int(stop·N), so they work for any model and scheduler.
    """

    def __init__(
        self,
        guidance_scale: float,
        sigma_lo: float = SIGMA_LO,
        sigma_hi: float = SIGMA_HI,
        start: float = 0.0,
        stop: float = 1.0,
    ) -> None:
        check_interval({"sigma_lo": sigma_lo, "sigma_hi": sigma_hi, "start": start, "stop": stop})
        self.guidance_scale = guidance_scale
        self.sigma_lo, self.sigma_hi = sigma_lo, sigma_hi
        self.start, self.stop = start, stop

    def needs(self, ctx: GuidanceContext, cfg: bool) -> tuple[str, ...]:
        inside = cfg and in_interval(ctx, self.sigma_lo, self.sigma_hi, self.start, self.stop)
        return ("uncond", "cond") if inside else ("cond",)

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        if preds.uncond is None:  # outside the interval: the conditional prediction alone
            return GuidanceOutput(preds.cond, 1.0)
        return GuidanceOutput(cfg(preds.cond, preds.uncond, self.guidance_scale), self.guidance_scale)


def check_interval(params: dict[str, float]) -> None:
    """Cross-parameter rule: sigma_lo ≤ sigma_hi and start ≤ stop; a reversed window is a typo, never a request."""
    if params["sigma_lo"] > params["sigma_hi"]:
        raise ValueError(
            f"interval: sigma_lo must be <= sigma_hi, got sigma_lo={params['sigma_lo']} > sigma_hi={params['sigma_hi']}"
        )
    if params["start"] > params["stop"]:
        raise ValueError(f"interval: start must be <= stop, got start={params['start']} > stop={params['stop']}")
