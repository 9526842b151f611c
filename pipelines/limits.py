"""The work a public playground accepts per request, and what it keeps on disk: one frozen record, read from the
environment once (by app.py or the CLI) and handed down to the request builder, the worker and the outputs.

Measured on this project's 2-core CPU machine, embedded model, CFG on, one torch thread (noisy, shared cores):
64² 0.02–0.05 s per step, 128² 0.13 s, 256² 0.73 s, i.e. ~1.1e-5 s per pixel-step; 512² ~3 s per step. So a
pixels × steps budget of 2**22 (64² × 1024 steps, 256² × 64) keeps an embedded run under about a minute there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping

# Environment variable for each Limits field; Limits.from_env reads these and nothing else.
ENV_VARS = {
    "max_pixels": "PLAYGROUND_MAX_PIXELS",
    "max_steps": "PLAYGROUND_MAX_STEPS",
    "max_work": "PLAYGROUND_MAX_WORK",
    "max_prompt_chars": "PLAYGROUND_MAX_PROMPT_CHARS",
    "max_run_seconds": "PLAYGROUND_MAX_RUN_SECONDS",
    "max_runs_kept": "PLAYGROUND_MAX_RUNS_KEPT",
    "max_output_mb": "PLAYGROUND_MAX_OUTPUT_MB",
    "allow_heavy_models": "PLAYGROUND_ALLOW_HEAVY_MODELS",
    "model_switch_seconds": "PLAYGROUND_MODEL_SWITCH_SECONDS",
}

TIERS = ("small", "standard", "heavy")  # model weight classes (pipelines/registry.py ModelEntry.tier)


@dataclass(frozen=True)
class Budget:
    """What one request may cost for a model tier on a device."""

    max_pixels: int  # width × height of the image
    max_steps: int  # num_inference_steps
    max_work: int  # width × height × num_inference_steps


# Defaults per (tier, device kind). "cpu" is every device that is not CUDA. The PLAYGROUND_MAX_* variables replace a
# number for every tier at once.
DEFAULT_BUDGETS: dict[tuple[str, str], Budget] = {
    # The embedded model (and any denoiser under 50 M parameters): up to 256², 1000 steps, about a minute of CPU.
    ("small", "cpu"): Budget(256 * 256, 1000, 2**22),
    ("small", "cuda"): Budget(1024 * 1024, 1000, 1024 * 1024 * 250),
    # SD 1.x / 2.x (~1 B parameters): their native 512² at their recommended steps; minutes per run on a CPU.
    ("standard", "cpu"): Budget(512 * 512, 50, 512 * 512 * 30),
    ("standard", "cuda"): Budget(1024 * 1024, 200, 1024 * 1024 * 100),
    # SDXL, PixArt-Σ, SD3.5 (T5-XXL): not offered on a CPU unless PLAYGROUND_ALLOW_HEAVY_MODELS=1.
    ("heavy", "cpu"): Budget(1024 * 1024, 50, 1024 * 1024 * 30),
    ("heavy", "cuda"): Budget(1536 * 1536, 200, 1024 * 1024 * 60),
}


@dataclass(frozen=True)
class Limits:
    """Per-request work limits and storage bounds. None for a work limit: the tier/device default (DEFAULT_BUDGETS)."""

    max_pixels: int | None = None  # width × height per image (PLAYGROUND_MAX_PIXELS)
    max_steps: int | None = None  # num_inference_steps (PLAYGROUND_MAX_STEPS); never above types.MAX_STEPS
    max_work: int | None = None  # width × height × num_inference_steps (PLAYGROUND_MAX_WORK)
    max_prompt_chars: int = 2000  # characters of prompt and of negative prompt, before tokenizing
    max_run_seconds: float = 120.0  # wall-clock seconds one run may take before the worker stops it
    max_runs_kept: int = 200  # finished runs kept in the outputs folder; the oldest are removed first
    max_output_mb: float = 1024.0  # megabytes (2**20 bytes) of finished runs kept in the outputs folder
    allow_heavy_models: bool | None = None  # offer SDXL / PixArt-Σ / SD3.5; None: only on CUDA
    model_switch_seconds: float = 30.0  # a loaded model stays at least this long before another replaces it (0: off)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_steps", "max_work"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} ({ENV_VARS[name]}) must be a whole number >= 1 or unset, got {value!r}")
        for name in ("max_prompt_chars", "max_runs_kept"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({ENV_VARS[name]}) must be a whole number >= 1, got {value!r}")
        for name, low in (("max_run_seconds", 0.0), ("max_output_mb", 0.0), ("model_switch_seconds", -1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
                bound = ">= 0" if low < 0 else "> 0"
                raise ValueError(f"{name} ({ENV_VARS[name]}) must be a finite number {bound}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.allow_heavy_models not in (None, True, False):
            raise ValueError(f"allow_heavy_models must be true, false or None, got {self.allow_heavy_models!r}")

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_output_mb * 2**20)

    def budget(self, tier: str, device: str) -> Budget:
        """The budget for a model tier ("small", "standard", "heavy") on a device type ("cpu", "cuda", ...)."""
        if tier not in TIERS:
            raise ValueError(f"unknown model tier {tier!r}; choose one of: {', '.join(TIERS)}")
        base = DEFAULT_BUDGETS[(tier, "cuda" if device == "cuda" else "cpu")]
        return Budget(max_pixels=self.max_pixels or base.max_pixels, max_steps=self.max_steps or base.max_steps,
                      max_work=self.max_work or base.max_work)

    def heavy_allowed(self, device: str) -> bool:
        """Whether heavy models are offered on `device` (PLAYGROUND_ALLOW_HEAVY_MODELS, else only on CUDA)."""
        return device == "cuda" if self.allow_heavy_models is None else self.allow_heavy_models

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Limits:
        """Limits from PLAYGROUND_* variables (ENV_VARS); unset or empty keeps the default. A value that does not
        parse is a ValueError naming the variable and what it takes, so a misconfigured server fails at startup."""
        kinds = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for name, var in ENV_VARS.items():
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            kind = kinds[name]
            if "bool" in kind:
                flag = raw.lower()
                if flag not in _FLAGS:
                    raise ValueError(f"{var} must be 1/true/yes, 0/false/no or auto, got {raw!r}")
                values[name] = _FLAGS[flag]
            elif "int" in kind:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{var} must be a whole number >= 1, got {raw!r}") from None
            else:
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ValueError(f"{var} must be a number, got {raw!r}") from None
        return cls(**values)


_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False,
          "auto": None}
