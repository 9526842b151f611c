"""The contract every guidance method follows: tensors in, guided prediction out. Imports torch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidanceContext:
    """Where the denoising loop is when it asks for guidance."""

    step: int  # 0-based index of the loop iteration
    num_steps: int  # total loop iterations (len(timesteps))
    timestep: float  # scheduler timestep t of this iteration
    sigma: float | None  # noise level: k-diffusion σ for VP models, flow σ∈[0,1] for flow models


@dataclass(frozen=True)
class GuidanceOutput:
    """A guided model output plus what the method did, for per-step diagnostics."""

    pred: torch.Tensor  # guided prediction (B, C, H, W), same space as the inputs (ε, v or flow velocity)
    effective_scale: float  # scale actually applied this step (1.0 means conditional prediction only)


class GuidanceMethod:
    """Base class: one instance per generation run, so stateful methods (APG momentum) start fresh."""

    # True asks the loop for a third pass whose self-attention is perturbed (PAG); it then calls perturbed().
    perturbed_pass: bool = False

    def wants_uncond(self, ctx: GuidanceContext) -> bool:
        """Whether this step needs the unconditional pass; False lets the loop skip it (cond-only step)."""
        return True

    def __call__(
        self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, ctx: GuidanceContext
    ) -> GuidanceOutput:
        """Combine the conditional and unconditional predictions (B, C, H, W) into one."""
        raise NotImplementedError

    def perturbed(
        self,
        pred_cond: torch.Tensor,
        pred_uncond: torch.Tensor | None,
        pred_perturbed: torch.Tensor,
        ctx: GuidanceContext,
    ) -> GuidanceOutput:
        """Combine predictions when `perturbed_pass` is set; pred_uncond is None when CFG is off (scale <= 1)."""
        raise NotImplementedError
