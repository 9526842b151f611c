"""Scheduler metadata: which samplers draw fresh noise and how many denoiser calls a run makes, checked against
the real diffusers schedulers and against the loop itself."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

from pipelines.generate import generate
from pipelines.observers import Observer
from pipelines.schedulers import (
    SCHEDULERS,
    default_config,
    describe_choice,
    is_stochastic,
    key_of,
    make_scheduler,
    model_evaluations,
)
from pipelines.types import GenerationRequest


class Counter(Observer):
    def __init__(self) -> None:
        self.steps = 0

    def on_step(self, event) -> None:
        self.steps += 1


@pytest.mark.parametrize("key", list(SCHEDULERS))
def test_stochastic_flag_matches_what_step_does(key: str) -> None:
    assert SCHEDULERS[key].stochastic is is_stochastic(key)
    assert isinstance(describe_choice(key), str)


def test_the_stochastic_ones_are_the_ancestral_ddpm_and_lcm() -> None:
    assert {k for k, s in SCHEDULERS.items() if s.stochastic} == {"ddpm", "euler_a", "lcm"}


def test_sde_dpm_solver_is_stochastic_and_dpmpp_2m_is_not_whatever_the_config() -> None:
    sde = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    assert is_stochastic(sde) and key_of(sde) != "dpmpp_2m"
    built = SCHEDULERS["dpmpp_2m"].build(sde.config)
    assert built.config.algorithm_type == "dpmsolver++" and not is_stochastic(built) and key_of(built) == "dpmpp_2m"
    assert describe_choice(None, sde) == "model's own (DPMSolverMultistepScheduler) — stochastic, 1 evaluation per step"
    assert describe_choice("dpmpp_2m", sde) == "dpmpp_2m — deterministic, 1 evaluation per step"


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_evaluation_counts_on_the_embedded_models_config(n: int) -> None:
    assert model_evaluations("heun", n) == 2 * n - 1
    assert model_evaluations("pndm", n) == (n + 1 if n > 1 else 1)  # PLMS warm-up: one extra step
    for key in SCHEDULERS:
        if key not in ("heun", "pndm"):
            assert model_evaluations(key, n) == n, key


def test_pndm_without_skip_prk_steps_would_run_runge_kutta_warm_up() -> None:
    """Why "pndm" sets skip_prk_steps: an SD config that does not name it (the embedded v1's did not) gets PNDM's
    default, PRK. (The embedded v2 refuses PNDM: it has no zero-SNR schedule.)"""
    config = {k: v for k, v in default_config("discrete").items()
              if k not in ("rescale_betas_zero_snr", "timestep_spacing", "prediction_type")}
    plain = PNDMScheduler.from_config(config)
    assert plain.config.skip_prk_steps is False
    assert model_evaluations(plain, 20) == 29
    with pytest.raises(ValueError):
        model_evaluations(plain, 3)
    assert make_scheduler(plain, "pndm").config.skip_prk_steps is True


def test_instance_is_measured_on_a_copy() -> None:
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)  # needs μ, which the helper supplies
    before = sched.timesteps.clone()  # the training schedule, before any set_timesteps
    assert model_evaluations(sched, 7) == 7
    assert torch.equal(sched.timesteps, before)  # untouched
    with pytest.raises(ValueError, match="config only with a registry key"):
        model_evaluations(sched, 7, config={})


@pytest.mark.parametrize(("key", "n"), [("heun", 3), ("pndm", 3), ("euler_a", 3), (None, 3)])
def test_loop_makes_exactly_model_evaluations_calls(tiny_loader, key: str | None, n: int) -> None:
    pipe = tiny_loader.get("sd")
    counter = Counter()
    generate(GenerationRequest(prompt="a red circle", model="sd", scheduler=key, num_inference_steps=n,
                               guidance_scale=3.0, seed=0, width=32, height=32), counter, loader=tiny_loader)
    expected = model_evaluations(pipe.scheduler, n) if key is None else model_evaluations(key, n, pipe.scheduler.config)
    assert counter.steps == expected
    assert counter.steps == {"heun": 5, "pndm": 4, "euler_a": 3, None: 4}[key]  # tiny sd's own scheduler is PLMS


def test_describe_choice_labels() -> None:
    assert describe_choice("euler_a") == "euler_a — stochastic, 1 evaluation per step"
    assert describe_choice("heun") == "heun — deterministic, ~2 evaluations per step (2N-1 in all)"
    assert describe_choice("pndm") == "pndm — deterministic, ~1 evaluation per step (N+1 in all)"
    own = DPMSolverMultistepScheduler.from_config(default_config("discrete"))
    assert describe_choice(None, own) == "model's own (dpmpp_2m) — deterministic, 1 evaluation per step"
    assert describe_choice(None, FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)).endswith(
        "stochastic, 1 evaluation per step")


def test_describe_choice_errors_name_what_is_missing() -> None:
    with pytest.raises(ValueError, match="needs model_scheduler"):
        describe_choice(None)
    with pytest.raises(ValueError, match="unknown scheduler 'euler_ancestral'; choose one of: ddim, ddpm"):
        describe_choice("euler_ancestral")
    with pytest.raises(ValueError, match="unknown scheduler"):
        model_evaluations("nope", 4)


def test_is_stochastic_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    is_stochastic("euler_a")
    assert torch.equal(torch.rand(3), expected)
