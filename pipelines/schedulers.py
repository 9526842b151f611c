"""Explicit scheduler registry: key -> diffusers scheduler class + config overrides, built with from_config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

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


@dataclass(frozen=True)
class SchedulerSpec:
    """A registered sampler."""

    key: str  # registry key used by requests, the CLI and the UI
    cls: type[SchedulerMixin]  # diffusers scheduler class
    label: str  # AUTOMATIC1111 sampler name, for the PNG `parameters` chunk
    kind: str  # "discrete" (VP noise schedule: ε / v models) or "flow" (flow matching)
    overrides: Mapping[str, Any] = field(default_factory=dict)  # applied on top of the model's scheduler config

    def build(self, config: Mapping[str, Any]) -> SchedulerMixin:
        """A fresh scheduler from a model's scheduler config, as `Cls.from_config(config, **overrides)`."""
        return self.cls.from_config(config, **self.overrides)


SCHEDULERS: dict[str, SchedulerSpec] = {s.key: s for s in (
    SchedulerSpec("ddim", DDIMScheduler, "DDIM", "discrete"),
    SchedulerSpec("ddpm", DDPMScheduler, "DDPM", "discrete"),
    SchedulerSpec("pndm", PNDMScheduler, "PLMS", "discrete"),
    SchedulerSpec("lms", LMSDiscreteScheduler, "LMS", "discrete"),
    SchedulerSpec("euler", EulerDiscreteScheduler, "Euler", "discrete"),
    SchedulerSpec("euler_a", EulerAncestralDiscreteScheduler, "Euler a", "discrete"),
    SchedulerSpec("heun", HeunDiscreteScheduler, "Heun", "discrete"),
    SchedulerSpec("dpmpp_2m", DPMSolverMultistepScheduler, "DPM++ 2M", "discrete", {"use_karras_sigmas": False}),
    SchedulerSpec("dpmpp_2m_karras", DPMSolverMultistepScheduler, "DPM++ 2M Karras", "discrete", {"use_karras_sigmas": True}),
    SchedulerSpec("unipc", UniPCMultistepScheduler, "UniPC", "discrete"),
    SchedulerSpec("lcm", LCMScheduler, "LCM", "discrete"),
    SchedulerSpec("flow_euler", FlowMatchEulerDiscreteScheduler, "Euler", "flow"),
)}


def schedule_kind(scheduler: SchedulerMixin) -> str:
    """'flow' for flow-matching schedulers (SD3, Flux), 'discrete' for the VP schedules of ε/v models."""
    return "flow" if type(scheduler).__name__.startswith("FlowMatch") else "discrete"


def compatible_keys(scheduler: SchedulerMixin) -> list[str]:
    """Registry keys usable with a model whose own scheduler is `scheduler`."""
    kind = schedule_kind(scheduler)
    return [k for k, s in SCHEDULERS.items() if s.kind == kind]


def key_of(scheduler: SchedulerMixin) -> str:
    """The registry key matching a scheduler instance, or its class name when none does."""
    for spec in SCHEDULERS.values():
        if type(scheduler) is spec.cls and all(scheduler.config.get(k) == v for k, v in spec.overrides.items()):
            return spec.key
    return type(scheduler).__name__


def make_scheduler(model_scheduler: SchedulerMixin, key: str | None) -> SchedulerMixin:
    """A fresh scheduler for one run: `key` from the registry, or a copy of the model's own when key is None."""
    if key is None:
        return type(model_scheduler).from_config(model_scheduler.config)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {key!r}; valid for this model: {', '.join(compatible_keys(model_scheduler))}")
    valid = compatible_keys(model_scheduler)
    if key not in valid:
        raise ValueError(
            f"scheduler {key!r} does not fit this model ({schedule_kind(model_scheduler)} schedule); "
            f"valid for this model: {', '.join(valid)}"
        )
    return SCHEDULERS[key].build(model_scheduler.config)
