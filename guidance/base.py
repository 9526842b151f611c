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


# The loop's one batched model call stacks the predictions a step needs in this order, as diffusers batches them.
PREDICTIONS = ("uncond", "cond", "perturbed")


@dataclass(frozen=True)
class Predictions:
    """The model's predictions at one step (B, C, H, W) each, by name; one a method did not ask for is None."""

    cond: torch.Tensor  # with the prompt
    uncond: torch.Tensor | None = None  # with the negative (or empty) prompt
    perturbed: torch.Tensor | None = None  # with the prompt, through the denoiser as the method's Perturbation changes it


# What an extra ("perturbed") pass can change in the denoiser; the model family installs it (pipelines/families.py).
PERTURBATION_KINDS = (
    "identity_attention",  # self-attention map replaced by the identity in the family's PAG layers (PAG)
    "skip_blocks",  # the family's guidance blocks return their input unchanged (SLG, AutoGuidance)
    "blur_query",  # the self-attention query of the guidance blocks blurred over the image plane (SEG)
)


@dataclass(frozen=True)
class Perturbation:
    """What a method's extra pass perturbs; the pass runs with the prompt, batched after [uncond?, cond]."""

    kind: str  # one of PERTURBATION_KINDS
    blur_sigma: float = 0.0  # blur_query: Gaussian σ in tokens; above blur_threshold_inf the query is its mean
    blur_threshold_inf: float = 9999.0  # blur_query: σ above this means infinite blur (diffusers' default)

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; allowed: {', '.join(PERTURBATION_KINDS)}")


class GuidanceMethod:
    """Base class: one instance per generation run, so stateful methods (APG momentum) start fresh.

    A method says which predictions it uses in a run (`uses`) and which it needs at each step (`needs`), and gets
    them by name in one call; after diffusers' guiders, whose `num_conditions` tells the pipeline how many to make.
    """

    # Every prediction a run of this method may ask for; "perturbed" makes the loop install the perturbed pass.
    uses: tuple[str, ...] = ("uncond", "cond")
    # What the "perturbed" pass changes in the denoiser; set exactly when "perturbed" is in `uses`.
    perturbation: Perturbation | None = None

    def needs(self, ctx: GuidanceContext, cfg: bool) -> tuple[str, ...]:
        """The predictions this step needs, in PREDICTIONS order. cfg is False when the scale turns CFG off (<= 1,
        as diffusers) or the model is guidance-distilled: then there is no unconditional prediction."""
        return ("uncond", "cond") if cfg else ("cond",)

    def __call__(self, preds: Predictions, ctx: GuidanceContext) -> GuidanceOutput:
        """Combine the predictions this step asked for into one. Not called for a step that needs only "cond"."""
        raise NotImplementedError
