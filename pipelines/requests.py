"""The one place a GenerationRequest is built from user-facing values (UI widgets, the HTTP API, the CLI).

Widgets send floats (`20.0`), the HTTP API sends sentinels (`-1` = recommended / random, `0` = the model's
native size, `""` = the model's own scheduler), the CLI sends None for an unset flag. All of them mean the
same few things, so they are decoded here, once: recommended steps and guidance scale filled in from the
registry (or the stock pipeline's own defaults), whole numbers checked instead of silently rounded, and
every refusal a ValueError that says what is allowed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from pipelines.loading import ModelLoader
from pipelines.registry import MODELS, recommended_settings, resolve
from pipelines.types import DEFAULT_MODEL, MAX_STEPS, GenerationRequest

OWN_SCHEDULER = "model default"  # the UI dropdown's value for "keep the model's own scheduler"
MAX_GUIDANCE_SCALE = 100.0  # far past any useful CFG scale; above it images are black or NaN


def _unset(value: Any, *sentinels: Any) -> bool:
    """None, an empty string, or one of the entry point's sentinels (e.g. -1) means 'not given'."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    return any(type(value) is not bool and value == s for s in sentinels)


def whole_number(name: str, value: Any) -> int:
    """A number that must be whole: 20, 20.0 and "20" are 20; 1.5, "abc", True and NaN are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def number(name: str, value: Any) -> float:
    """A finite number (int, float or numeric string)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def parse_guidance_params(value: Mapping[str, Any] | str | None) -> dict[str, float]:
    """A dict, or a JSON object as text ('{"guidance_rescale": 0.7}'); None or "" is no parameters."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ValueError('guidance_params must be a JSON object such as {"guidance_rescale": 0.7}')
    if not isinstance(value, Mapping):
        raise ValueError('guidance_params must be a JSON object such as {"guidance_rescale": 0.7}')
    return {str(k): number(f"guidance parameter {k!r}", v) for k, v in value.items()}


def missing_embedded(model: str) -> str | None:
    """A message when the embedded model is asked for but its folder is not there (a clone without assets)."""
    if model == DEFAULT_MODEL and not Path(resolve(model)).is_dir():
        return (f"The embedded model '{DEFAULT_MODEL}' is not installed: {resolve(model)} is missing. "
                f"Train and export it (training/) or pick another model.")
    return None


def recommended(model: str, loader: ModelLoader) -> dict[str, float | int]:
    """Steps and guidance scale for `model`: the registry's, else its stock pipeline's defaults (loads it)."""
    entry = MODELS.get(model)
    if entry is not None:
        return {"num_inference_steps": entry.steps, "guidance_scale": entry.guidance_scale}
    return recommended_settings(model, loader.get(model))


def build_request(
    *,
    prompt: Any,
    model: str,
    loader: ModelLoader,
    negative_prompt: Any = "",
    scheduler: str | None = None,
    num_inference_steps: Any = None,
    guidance_scale: Any = None,
    seed: Any = None,
    width: Any = None,
    height: Any = None,
    guidance: str | None = "cfg",
    guidance_params: Mapping[str, Any] | str | None = None,
) -> GenerationRequest:
    """A validated request from user-facing values; raises ValueError naming what is allowed.

    Unset (None, "", or the API's sentinels): num_inference_steps / guidance_scale -1 take the model's
    recommended values; seed -1 draws a random one; width / height 0 take the model's native size;
    scheduler "" or "model default" keeps the model's own; guidance "" is plain CFG.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be one of the offered models, got an empty value")
    loader.check_allowed(model)
    missing = missing_embedded(model) if loader.loaded(model) is None else None
    if missing:
        raise ValueError(missing)
    if prompt is None:
        prompt = ""
    if negative_prompt is None:
        negative_prompt = ""

    steps_unset, scale_unset = _unset(num_inference_steps, -1), _unset(guidance_scale, -1)
    defaults = recommended(model, loader) if steps_unset or scale_unset else {}
    steps = defaults["num_inference_steps"] if steps_unset else whole_number("num_inference_steps", num_inference_steps)
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {MAX_STEPS}, got {steps}")
    scale = defaults["guidance_scale"] if scale_unset else number("guidance_scale", guidance_scale)
    if not 0 <= scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be from 0 to {MAX_GUIDANCE_SCALE:g}, got {scale:g}")

    seed_value = None if _unset(seed, -1) else whole_number("seed", seed)
    if seed_value is not None and not 0 <= seed_value < 2**63:
        raise ValueError(f"seed must be a whole number from 0 to 2**63-1 (or -1 for a random seed), got {seed_value}")
    sizes = {}
    for name, value in (("width", width), ("height", height)):
        sizes[name] = None if _unset(value, 0) else whole_number(name, value)

    scheduler_key = None if _unset(scheduler) or scheduler == OWN_SCHEDULER else str(scheduler).strip()
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        model=model,
        scheduler=scheduler_key,
        num_inference_steps=steps,
        guidance_scale=scale,
        seed=seed_value,
        width=sizes["width"],
        height=sizes["height"],
        guidance=(guidance or "cfg").strip() if isinstance(guidance, str) else guidance,
        guidance_params=parse_guidance_params(guidance_params),
    )
