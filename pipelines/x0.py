"""x̂0, the predicted clean latents, from a model output for ε, v and flow prediction, for any scheduler.

Schedulers keep latents in one of three spaces, and x̂0 follows from that space and the prediction type:
- VP space (DDIM, DDPM, PNDM, DPM-Solver, UniPC, LCM; `init_noise_sigma == 1`): x_t = α_t x0 + σ_t ε,
  α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t) (Ho et al. 2020; v-prediction: Salimans & Ho 2022).
- σ-scaled space (Euler, Euler a, Heun, LMS; `init_noise_sigma > 1`): x = x0 + σ ε (Karras et al. 2022);
  the model sees x / sqrt(σ² + 1).
- flow matching (SD3): x_σ = (1 − σ) x0 + σ ε, velocity v = ε − x0, so x0 = x − σ v (Lipman et al. 2023).
"""

from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin


def sigma_at(scheduler: SchedulerMixin, step: int, timestep: torch.Tensor, flow: bool) -> float:
    """Noise level of loop iteration `step`: flow σ for flow models, else k-diffusion σ = sqrt((1−ᾱ)/ᾱ)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > step:
        # For DPM-Solver/UniPC with Karras sigmas this is the exact σ the solver uses, not ᾱ of a rounded t.
        return float(sigmas[step])
    alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    if alpha_bar <= 0.0:  # zero terminal SNR (rescale_betas_zero_snr): the first step of a "trailing" schedule
        return math.inf
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """(α_t, σ_t) = (1, σ) / sqrt(σ² + 1) for a k-diffusion σ, including σ = ∞ (zero SNR: pure noise)."""
    if math.isinf(sigma):
        return 0.0, 1.0
    return 1.0 / (sigma**2 + 1) ** 0.5, sigma / (sigma**2 + 1) ** 0.5


def predict_x0(
    scheduler: SchedulerMixin,
    sigma: float,
    sample: torch.Tensor,
    model_output: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x̂0 (B, C, h, w) from the latents `sample` before the step and the model output at noise level `sigma`.

    `sigma` comes from `sigma_at`; the space is read off the scheduler as described in the module docstring.
    """
    sample32, out32 = sample.float(), model_output.float()
    if prediction_type == "flow":
        x0 = sample32 - sigma * out32
    elif prediction_type == "sample":
        x0 = out32
    else:
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if float(scheduler.init_noise_sigma) > 1.0:  # σ-scaled space: x = x0 + σ ε
            if prediction_type == "epsilon":
                x0 = sample32 - sigma * out32
            elif prediction_type == "v_prediction":
                # As EulerDiscreteScheduler.step: x0 = −σ/sqrt(σ²+1) · v + x/(σ²+1)
                x0 = out32 * -sigma_t + sample32 * alpha_t**2
            else:
                raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: epsilon, v_prediction, sample, flow")
        else:  # VP space: α = 1/sqrt(σ²+1), σ_t = σ α
            if prediction_type == "epsilon":
                x0 = (sample32 - sigma_t * out32) / alpha_t
            elif prediction_type == "v_prediction":
                x0 = alpha_t * sample32 - sigma_t * out32
            else:
                raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: epsilon, v_prediction, sample, flow")
    return x0.to(sample.dtype)
