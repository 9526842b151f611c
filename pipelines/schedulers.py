"""Explicit scheduler registry: key -> diffusers scheduler class + config overrides, built with from_config.

Each entry also records what a user choosing it should know: whether step() draws fresh noise (stochastic) and,
through model_evaluations(), how many denoiser calls a run of N steps makes.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipelines.registry import MODELS


@dataclass(frozen=True)
class SchedulerSpec:
    """A registered sampler."""

    key: str  # registry key used by requests, the CLI and the UI
    cls: type[SchedulerMixin]  # diffusers scheduler class
    label: str  # AUTOMATIC1111 sampler name, for the PNG `parameters` chunk
    kind: str  # "discrete" (VP noise schedule: ε / v models) or "flow" (flow matching)
    stochastic: bool  # step() adds fresh noise from the generator (ancestral / SDE samplers); checked by is_stochastic
    overrides: Mapping[str, Any] = field(default_factory=dict)  # applied on top of the model's scheduler config
    # Only for consistency-distilled models (lcm_capable): LCM's few big steps jump to a boundary-conditioned x̂0 that
    # only such a model predicts; an ordinary model gives lumpy, misshapen shapes (the embedded model's star: a blob)
    distilled_only: bool = False

    def build(self, config: Mapping[str, Any]) -> SchedulerMixin:
        """A fresh scheduler from a model's scheduler config, as `Cls.from_config(config, **overrides)`."""
        return self.cls.from_config(config, **self.overrides)


# DPM++ 2M is the deterministic second-order multistep solver whatever the model's config says (a config with
# algorithm_type "sde-dpmsolver++" would otherwise make "dpmpp_2m" a stochastic DPM++ 2M SDE).
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SCHEDULERS: dict[str, SchedulerSpec] = {s.key: s for s in (
    SchedulerSpec("ddim", DDIMScheduler, "DDIM", "discrete", False),  # η = 0: the loop passes eta=0.0, as diffusers
    SchedulerSpec("ddpm", DDPMScheduler, "DDPM", "discrete", True),
    # PLMS as SD's own config runs it; without skip_prk_steps (configs that never name it, such as the embedded
    # model's) PNDM first takes Runge-Kutta steps: N+9 evaluations, and set_timesteps fails below N = 4.
    SchedulerSpec("pndm", PNDMScheduler, "PLMS", "discrete", False, {"skip_prk_steps": True}),
    SchedulerSpec("lms", LMSDiscreteScheduler, "LMS", "discrete", False),
    SchedulerSpec("euler", EulerDiscreteScheduler, "Euler", "discrete", False),  # s_churn = 0, diffusers' default
    SchedulerSpec("euler_a", EulerAncestralDiscreteScheduler, "Euler a", "discrete", True),
    SchedulerSpec("heun", HeunDiscreteScheduler, "Heun", "discrete", False),
    SchedulerSpec("dpmpp_2m", DPMSolverMultistepScheduler, "DPM++ 2M", "discrete", False,
                  _DPMPP_2M | {"use_karras_sigmas": False}),
    SchedulerSpec("dpmpp_2m_karras", DPMSolverMultistepScheduler, "DPM++ 2M Karras", "discrete", False,
                  _DPMPP_2M | {"use_karras_sigmas": True}),
    SchedulerSpec("unipc", UniPCMultistepScheduler, "UniPC", "discrete", False),
    SchedulerSpec("lcm", LCMScheduler, "LCM", "discrete", True, distilled_only=True),  # re-noises x̂0 each step
    SchedulerSpec("flow_euler", FlowMatchEulerDiscreteScheduler, "Euler", "flow", False, {"stochastic_sampling": False}),
)}


def schedule_kind(scheduler: SchedulerMixin | Mapping[str, Any]) -> str:
    """'flow' for flow-matching schedulers (SD3, Flux), 'discrete' for the VP schedules of ε/v models; takes an
    instance or its config (whose `_class_name` names the class)."""
    name = type(scheduler).__name__ if isinstance(scheduler, SchedulerMixin) else str(scheduler.get("_class_name", ""))
    return "flow" if name.startswith("FlowMatch") else "discrete"


def _config(scheduler: SchedulerMixin | Mapping[str, Any]) -> Mapping[str, Any]:
    return scheduler.config if isinstance(scheduler, SchedulerMixin) else scheduler


def lcm_capable(scheduler: SchedulerMixin | Mapping[str, Any], denoiser_config: Mapping[str, Any] | None) -> bool:
    """Whether a model was distilled for latent-consistency sampling (Luo et al. 2023, arXiv:2310.04378): its UNet
    takes the guidance scale as an embedding (time_cond_proj_dim: LCM-distilled SD / SDXL), or it ships an
    LCMScheduler (a model with LCM-LoRA fused in, PixArt-LCM). `denoiser_config`: its UNet's or transformer's config
    (None when unknown: then only the scheduler can tell)."""
    name = type(scheduler).__name__ if isinstance(scheduler, SchedulerMixin) else str(scheduler.get("_class_name", ""))
    return name == "LCMScheduler" or (denoiser_config or {}).get("time_cond_proj_dim") is not None


def why_not(key: str, scheduler: SchedulerMixin | Mapping[str, Any],
            denoiser_config: Mapping[str, Any] | None = None) -> str | None:
    """Why registry `key` cannot run a model whose own scheduler (or its config) is `scheduler` and whose UNet or
    transformer has `denoiser_config` (None: unknown); None when it can.

    A model trained on a zero-terminal-SNR schedule (`rescale_betas_zero_snr`, Lin et al. 2023, arXiv:2305.08891)
    needs a sampler that rebuilds that schedule: one without the option would silently sample the unrescaled
    schedule, whose last step keeps a share of the image in x_T that such a model never saw. LCM needs a
    consistency-distilled model (lcm_capable).
    """
    spec = _spec(key)
    kind = schedule_kind(scheduler)
    if spec.kind != kind:
        return f"it is a {spec.kind} sampler and this model has a {kind} schedule"
    if flux_transformer(denoiser_config) and not (_takes_in_set_timesteps(spec.cls, "sigmas")
                                                  and _takes_in_set_timesteps(spec.cls, "mu")):
        return (f"Flux sets its schedule from sigmas 1 -> 1/N and a resolution shift mu (as FluxPipeline); "
                f"{spec.cls.__name__}.set_timesteps takes neither")
    if spec.distilled_only and not lcm_capable(scheduler, denoiser_config):
        # Short: with make_scheduler's list of what fits it stays inside a client message (pipelines/errors.py)
        return ("LCM needs a latent-consistency-distilled model (a UNet with time_cond_proj_dim, or its own "
                "LCMScheduler); on this one its few big steps give lumpy, misshapen shapes; for few steps use dpmpp_2m")
    if _config(scheduler).get("rescale_betas_zero_snr"):
        if not _takes(spec.cls, "rescale_betas_zero_snr"):
            return (f"{spec.cls.__name__} cannot rebuild this model's zero-terminal-SNR schedule "
                    "(rescale_betas_zero_snr) and would sample a schedule it was not trained on")
        if spec.overrides.get("use_karras_sigmas"):
            # diffusers 0.42: from σ_max = 4096 (its stand-in for ∞) Karras sigmas put several steps on t = 999,
            # and DPM-Solver then starts its step index at the second of them and runs past its sigmas (21+ steps)
            return ("Karras sigmas from this model's zero-terminal-SNR σ_max put several steps on the same "
                    "timestep, and DPM-Solver then runs past its schedule; dpmpp_2m is the same solver without them")
    return None


def flux_transformer(denoiser_config: Mapping[str, Any] | None) -> bool:
    """Whether a denoiser config is a Flux transformer's (FluxTransformer2DModel: rotary axes and the guidance flag)."""
    config = denoiser_config or {}
    return "axes_dims_rope" in config and "guidance_embeds" in config


def _takes_in_set_timesteps(cls: type, parameter: str) -> bool:
    return parameter in inspect.signature(cls.set_timesteps).parameters


@lru_cache(maxsize=None)
def _takes(cls: type, parameter: str) -> bool:
    return parameter in inspect.signature(cls.__init__).parameters


def compatible_keys(scheduler: SchedulerMixin | Mapping[str, Any],
                    denoiser_config: Mapping[str, Any] | None = None) -> list[str]:
    """Registry keys usable with a model whose own scheduler (or its config) is `scheduler` and whose denoiser has
    `denoiser_config` (None: unknown, so only a shipped LCMScheduler admits lcm)."""
    return [k for k in SCHEDULERS if why_not(k, scheduler, denoiser_config) is None]


def denoiser_config(pipe: Any) -> Mapping[str, Any] | None:
    """The config of a loaded pipeline's UNet or transformer (what lcm_capable reads); None when it has neither."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return getattr(denoiser, "config", None)


def _folder_json(source: str, *parts: str) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(source, *parts).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_config(source: str) -> dict[str, Any] | None:
    """The scheduler config a local diffusers folder ships (read without loading any weights); None for a hub id or
    a folder without one."""
    return _folder_json(source, "scheduler", "scheduler_config.json")


def folder_denoiser_config(source: str) -> dict[str, Any] | None:
    """The UNet's (else the transformer's) config of a local diffusers folder, read without loading any weights."""
    return _folder_json(source, "unet", "config.json") or _folder_json(source, "transformer", "config.json")


def key_of(scheduler: SchedulerMixin) -> str:
    """The registry key matching a scheduler instance, or its class name when none does."""
    for spec in SCHEDULERS.values():
        if type(scheduler) is spec.cls and all(scheduler.config.get(k) == v for k, v in spec.overrides.items()):
            return spec.key
    return type(scheduler).__name__


def make_scheduler(model_scheduler: SchedulerMixin, key: str | None,
                   denoiser_config: Mapping[str, Any] | None = None) -> SchedulerMixin:
    """A fresh scheduler for one run: `key` from the registry, or a copy of the model's own when key is None.
    `denoiser_config`: the model's UNet or transformer config (denoiser_config(pipe)), which says whether lcm fits."""
    if key is None:
        return type(model_scheduler).from_config(model_scheduler.config)
    check_fits(key, model_scheduler, denoiser_config)
    return SCHEDULERS[key].build(model_scheduler.config)


def check_fits(key: str, scheduler: SchedulerMixin | Mapping[str, Any],
               denoiser_config: Mapping[str, Any] | None = None) -> None:
    """ValueError unless registry `key` fits the model (its own scheduler or config, its denoiser's config), saying
    why not and which keys do."""
    valid = ", ".join(compatible_keys(scheduler, denoiser_config))
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {key!r}; valid for this model: {valid}")
    reason = why_not(key, scheduler, denoiser_config)
    if reason is not None:
        raise ValueError(f"scheduler {key!r} does not fit this model: {reason}; valid for this model: {valid}")


def _spec(key: str) -> SchedulerSpec:
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {key!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key]


@lru_cache(maxsize=None)
def _default_config_json(kind: str) -> str:
    """The config a key is measured with when no model is given: the embedded model's, or diffusers' flow default."""
    if kind == "flow":
        return json.dumps(dict(FlowMatchEulerDiscreteScheduler().config))
    path = Path(MODELS["tiny-shapes"].source) / "scheduler" / "scheduler_config.json"
    return path.read_text()


def default_config(kind: str) -> dict[str, Any]:
    """A scheduler config of schedule `kind` ("discrete": the embedded model's; "flow": FlowMatchEuler's defaults)."""
    if kind not in ("discrete", "flow"):
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of: discrete, flow")
    return json.loads(_default_config_json(kind))


def _fresh(scheduler: str | SchedulerMixin, config: Mapping[str, Any] | None) -> SchedulerMixin:
    """A new scheduler: a copy of an instance (never the caller's, whose state a run owns), or a key built from
    `config` (default: default_config of its kind)."""
    if isinstance(scheduler, str):
        spec = _spec(scheduler)
        return spec.build(config if config is not None else default_config(spec.kind))
    return type(scheduler).from_config(scheduler.config)


def _set_timesteps(scheduler: SchedulerMixin, num_inference_steps: int) -> None:
    # Dynamic shifting (Flux-style flow configs) needs a shift μ; it moves the timesteps, not their number.
    kwargs = {"mu": 1.0} if scheduler.config.get("use_dynamic_shifting", False) else {}
    scheduler.set_timesteps(num_inference_steps, device="cpu", **kwargs)


def model_evaluations(
    scheduler: str | SchedulerMixin, num_inference_steps: int, config: Mapping[str, Any] | None = None
) -> int:
    """Denoiser calls the loop makes for `num_inference_steps`: len(timesteps) after set_timesteps, one batched
    forward pass per iteration (CFG and PAG widen the batch, not the count). Heun: 2N − 1; PLMS: N + 1.

    `scheduler` is a registry key (built from `config`, default: default_config of its kind) or an instance
    (measured on a copy; `config` must then be None).
    """
    if not isinstance(scheduler, str) and config is not None:
        raise ValueError("model_evaluations: give config only with a registry key; an instance has its own")
    fresh = _fresh(scheduler, config)
    _set_timesteps(fresh, num_inference_steps)
    return len(fresh.timesteps)


def is_stochastic(scheduler: str | SchedulerMixin, config: Mapping[str, Any] | None = None) -> bool:
    """Whether step() draws fresh noise: two copies stepped once from the same state with different generators
    (and different global seeds, for schedulers that ignore the generator) give different samples."""
    outs = []
    for seed in (0, 1):
        fresh = _fresh(scheduler, config)
        _set_timesteps(fresh, 4)
        t = fresh.timesteps[0]
        sample = torch.linspace(-1.0, 1.0, 4 * 8 * 8).view(1, 4, 8, 8) * float(getattr(fresh, "init_noise_sigma", 1.0))
        model_output = torch.linspace(1.0, -1.0, 4 * 8 * 8).view(1, 4, 8, 8)
        kwargs: dict[str, Any] = {}
        if "generator" in inspect.signature(fresh.step).parameters:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if hasattr(fresh, "scale_model_input"):
                fresh.scale_model_input(sample, t)  # σ-space schedulers warn when step() comes without it
            outs.append(fresh.step(model_output, t, sample, **kwargs, return_dict=True).prev_sample)
    return not torch.equal(outs[0], outs[1])


def _per_step(scheduler: str | SchedulerMixin, config: Mapping[str, Any] | None) -> tuple[int, int]:
    """(a, b) with model_evaluations = a·N + b, read off N = 20 and N = 40 (every registered sampler is linear)."""
    e20, e40 = model_evaluations(scheduler, 20, config), model_evaluations(scheduler, 40, config)
    a = (e40 - e20) // 20
    return a, e20 - 20 * a


def describe_choice(key: str | None, model_scheduler: SchedulerMixin | None = None) -> str:
    """A short label for a scheduler choice, e.g. "euler_a — stochastic, 1 evaluation per step" or
    "heun — deterministic, ~2 evaluations per step (2N-1 in all)".

    key None means the model's own scheduler, which `model_scheduler` must then give; with a key,
    `model_scheduler` (when given) supplies the config the key is built from, as make_scheduler builds it.
    """
    if key is None:
        if model_scheduler is None:
            raise ValueError("describe_choice: key None (the model's own scheduler) needs model_scheduler")
        name, target, config = f"model's own ({key_of(model_scheduler)})", model_scheduler, None
    else:
        _spec(key)
        name, target = key, key
        config = dict(model_scheduler.config) if model_scheduler is not None else None
    noise = "stochastic" if is_stochastic(target, config) else "deterministic"
    a, b = _per_step(target, config)
    unit = "evaluation" if a == 1 else "evaluations"
    if b == 0:
        evaluations = f"{a} {unit} per step"
    else:
        evaluations = f"~{a} {unit} per step ({'' if a == 1 else a}N{b:+d} in all)"
    return f"{name} — {noise}, {evaluations}"
