"""The one place a GenerationRequest is built from user-facing values (UI widgets, the HTTP API, the CLI).

Widgets send floats (`20.0`), the HTTP API sends sentinels (`-1` = recommended / random, `0` = the model's
native size, `""` = the model's own scheduler), the CLI sends None for an unset flag. All of them mean the
same few things, so they are decoded here, once: recommended steps and guidance scale filled in from the
registry (or the stock pipeline's own defaults), whole numbers checked instead of silently rounded, and
every refusal a ValueError that says what is allowed.

It also enforces the work budget (pipelines/limits.py): prompt lengths, pixels, steps and pixels × steps per model tier
and device, so a public server refuses a request that would hold its one worker for hours, and the UI, the HTTP API
and the CLI refuse the same ones. Each refusal names the limit and the environment variable that raises it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from pipelines.errors import shown
from pipelines.families import family_of
from pipelines.limits import ENV_VARS, Limits
from pipelines.loading import ModelLoader
from pipelines.profile import Recommended, check_scheduler, recommended_for
from pipelines.registry import MODELS, resolve, tier_of
from pipelines.types import DEFAULT_MODEL, MAX_IMAGES_PER_PROMPT, MAX_SIDE, MAX_STEPS, GenerationRequest
from pipelines.words import counted

_ROOT = Path(__file__).resolve().parent.parent
OWN_SCHEDULER = "model default"  # the UI dropdown's value for "keep the model's own scheduler"
MAX_GUIDANCE_SCALE = 100.0  # far past any useful CFG scale; above it images are black or NaN
MAX_FIELD_CHARS = 2000  # text of a numeric, model, scheduler, guidance or guidance_params field, before parsing


def _unset(value: Any, *sentinels: Any) -> bool:
    """None, an empty string, or one of the entry point's sentinels (e.g. -1) means 'not given'."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    return any(type(value) is not bool and value == s for s in sentinels)


def whole_number(name: str, value: Any) -> int:
    """A number that must be whole: 20, 20.0 and "20" are 20; 1.5, "abc", True and NaN are refused."""
    refused = ValueError(f"{name} must be a whole number, got {shown(value)}")
    if isinstance(value, bool):
        raise refused
    if isinstance(value, str):
        if len(value) > 100:
            raise refused
        try:
            value = float(value.strip())
        except ValueError:
            raise refused from None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise refused
        return int(value)
    if isinstance(value, int):
        return value
    raise refused


def number(name: str, value: Any) -> float:
    """A finite number (int, float or numeric string)."""
    if isinstance(value, bool) or isinstance(value, str) and len(value) > 100:
        raise ValueError(f"{name} must be a number, got {shown(value)}")
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a number, got {shown(value)}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    return out


def parse_guidance_params(value: Mapping[str, Any] | str | None) -> dict[str, float]:
    """A dict, or a JSON object as text ('{"guidance_rescale": 0.7}'); None or "" is no parameters."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        if len(value) > MAX_FIELD_CHARS:
            raise ValueError(f"guidance_params must be at most {MAX_FIELD_CHARS} characters of JSON, got {len(value)}")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise ValueError('guidance_params must be a JSON object such as {"guidance_rescale": 0.7}')
    if not isinstance(value, Mapping):
        raise ValueError('guidance_params must be a JSON object such as {"guidance_rescale": 0.7}')
    return {str(k): number(f"guidance parameter {k!r}", v) for k, v in value.items()}


def missing_embedded(model: str) -> str | None:
    """A message when the embedded model is asked for but its folder is not there (a clone without assets)."""
    if model == DEFAULT_MODEL and not Path(resolve(model)).is_dir():
        where = Path(resolve(model))
        where = where.relative_to(_ROOT) if where.is_relative_to(_ROOT) else where.name  # no server paths in messages
        return (f"The embedded model '{DEFAULT_MODEL}' is not installed: {where} is missing. "
                f"Train and export it (training/) or pick another model.")
    return None


def recommended(model: str, loader: ModelLoader) -> Recommended:
    """The settings `model` takes when left unset: the registry's without loading anything, else its profile's
    (the stock pipeline's own defaults; loads it)."""
    return recommended_for(model, None) if model in MODELS else loader.profile(model).recommended


def text_field(name: str, value: Any, limit: int, variable: str | None = None) -> str:
    """A prompt-like field: a string (None is "") of at most `limit` characters, counted before tokenizing."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > limit:
        raise_by = f" (raise it with {variable})" if variable else ""
        raise ValueError(f"{name} is {len(value)} characters; the limit is {limit}{raise_by}")
    return value


def native_size(model: str, pipe: Any) -> int:
    """The side in pixels that width / height 0 render: the loaded pipeline's, else the registry entry's."""
    if pipe is not None:
        return family_of(pipe).default_size(pipe)
    return MODELS[model].size


def check_budget(model: str, tier: str, device: str, width: int, height: int, steps: int, limits: Limits,
                 images: int = 1) -> None:
    """Refuse a request over its tier's budget on this device (Limits.budget), naming the limit and its variable. A
    batch of `images` counts as that many images: its pixels (memory) and its pixel-steps (time)."""
    budget = limits.budget(tier, device)
    where = f"for {tier} models such as {model!r} on {'cuda' if device == 'cuda' else 'a cpu'}"
    max_steps = min(budget.max_steps, MAX_STEPS)
    if steps > max_steps:
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {max_steps} {where}, got {steps} "
                         f"(raise it with {ENV_VARS['max_steps']}, up to {MAX_STEPS})")
    pixels = width * height
    if pixels > budget.max_pixels:
        raise ValueError(f"{width}x{height} is {pixels} pixels; the limit {where} is {budget.max_pixels} "
                         f"(e.g. {_side(budget.max_pixels)}x{_side(budget.max_pixels)}; raise it with "
                         f"{ENV_VARS['max_pixels']})")
    if images > 1 and pixels * images > budget.max_pixels:
        most = counted(max(1, budget.max_pixels // pixels), "image")
        raise ValueError(f"a batch of {images} images of {width}x{height} is {pixels * images} pixels; the limit "
                         f"{where} is {budget.max_pixels} (at most {most} at this size; raise it with "
                         f"{ENV_VARS['max_pixels']})")
    if pixels * steps * images > budget.max_work:
        if images == 1:
            most = max(1, budget.max_work // pixels)
            raise ValueError(f"{width}x{height} x {counted(steps, 'step')} is {pixels * steps} pixel-steps; the limit "
                             f"{where} is {budget.max_work} (at most {counted(most, 'step')} at this size; raise it "
                             f"with {ENV_VARS['max_work']})")
        most = max(1, budget.max_work // (pixels * steps))
        raise ValueError(f"{images} images of {width}x{height} x {counted(steps, 'step')} is "
                         f"{pixels * steps * images} pixel-steps; the limit {where} is {budget.max_work} (at most {most} image"
                         f"{'s' if most > 1 else ''} per batch at this size and step count; raise it with "
                         f"{ENV_VARS['max_work']})")


def max_batch(tier: str, device: str, side: int, steps: int, limits: Limits) -> int:
    """The largest batch the budget allows for `side`x`side` images and `steps` steps (at least 1, at most
    MAX_IMAGES_PER_PROMPT): what the UI's batch slider offers."""
    budget = limits.budget(tier, device)
    pixels = side * side
    return max(1, min(MAX_IMAGES_PER_PROMPT, budget.max_pixels // pixels, budget.max_work // (pixels * steps)))


def _side(pixels: int) -> int:
    return math.isqrt(pixels) // 8 * 8


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
    num_images_per_prompt: Any = None,
    true_cfg_scale: Any = None,
    limits: Limits | None = None,
) -> GenerationRequest:
    """A validated request from user-facing values; raises ValueError naming what is allowed.

    Unset (None, "", or the API's sentinels): num_inference_steps / guidance_scale -1 take the model's
    recommended values; seed -1 draws a random one; width / height 0 take the model's native size;
    scheduler "" or "model default" keeps the model's own; guidance "" takes the model's recommended method (and
    its parameters when guidance_params is unset too); num_images_per_prompt unset is 1 (image i uses seed + i);
    true_cfg_scale unset is 1 (off; Flux only: true CFG against the negative prompt, see GenerationRequest).
    limits: the work budget (default: Limits(), the built-in defaults; app.py and the CLI pass Limits.from_env).
    """
    limits = limits or Limits()
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be one of the offered models, got an empty value")
    if len(model) > MAX_FIELD_CHARS:
        raise ValueError(f"model must be one of the offered models, got {len(model)} characters")
    loader.check_allowed(model)
    loader.check_switch(model)  # refused now rather than after waiting in the queue
    missing = missing_embedded(model) if loader.loaded(model) is None else None
    if missing:
        raise ValueError(missing)
    # Lengths first: nothing below should parse, tokenize or store a 10 MB prompt.
    var = ENV_VARS["max_prompt_chars"]
    prompt = text_field("prompt", prompt, limits.max_prompt_chars, var)
    negative_prompt = text_field("negative_prompt", negative_prompt, limits.max_prompt_chars, var)
    for name, value in (("scheduler", scheduler), ("guidance", guidance)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a key (text), got {type(value).__name__}")
        text_field(name, value, 100)

    steps_unset, scale_unset = _unset(num_inference_steps, -1), _unset(guidance_scale, -1)
    guidance_unset = _unset(guidance)
    rec = recommended(model, loader) if steps_unset or scale_unset or guidance_unset else None
    steps = rec.num_inference_steps if steps_unset else whole_number("num_inference_steps", num_inference_steps)
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be a whole number from 1 to {MAX_STEPS}, got {steps}")
    scale = rec.guidance_scale if scale_unset else number("guidance_scale", guidance_scale)
    if not 0 <= scale <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"guidance_scale must be from 0 to {MAX_GUIDANCE_SCALE:g}, got {scale:g}")

    seed_value = None if _unset(seed, -1) else whole_number("seed", seed)
    if seed_value is not None and not 0 <= seed_value < 2**63:
        raise ValueError(f"seed must be a whole number from 0 to 2**63-1 (or -1 for a random seed), got {seed_value}")
    sizes = {}
    for name, value in (("width", width), ("height", height)):
        sizes[name] = None if _unset(value, 0) else whole_number(name, value)
        if sizes[name] is not None and not 1 <= sizes[name] <= MAX_SIDE:
            raise ValueError(f"{name} must be a whole number from 1 to {MAX_SIDE} (or 0 for the model's size), "
                             f"got {sizes[name]}")

    images = 1 if _unset(num_images_per_prompt) else whole_number("num_images_per_prompt", num_images_per_prompt)
    if not 1 <= images <= MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"num_images_per_prompt must be a whole number from 1 to {MAX_IMAGES_PER_PROMPT}, got {images}")
    if seed_value is not None and seed_value + images > 2**63:
        raise ValueError(f"seed + num_images_per_prompt must stay below 2**63 (image i uses seed + i), got seed "
                         f"{seed_value} and {images} images")

    true_cfg = 1.0 if _unset(true_cfg_scale) else number("true_cfg_scale", true_cfg_scale)
    if not 0 <= true_cfg <= MAX_GUIDANCE_SCALE:
        raise ValueError(f"true_cfg_scale must be from 0 to {MAX_GUIDANCE_SCALE:g} (1 = off), got {true_cfg:g}")

    scheduler_key = None if _unset(scheduler) or scheduler == OWN_SCHEDULER else str(scheduler).strip()

    # The budget needs the model's weight class and native size: the registry knows them for its models; anything
    # else is measured on its pipeline (loaded here, as recommended() already does for unset values).
    pipe = loader.loaded(model)
    if pipe is None and model not in MODELS:
        pipe = loader.get(model)
    if scheduler_key is not None:  # refused now, with why and what fits, rather than after waiting in the queue
        check_scheduler(model, scheduler_key, pipe)
    if true_cfg != 1.0:  # refused now for a family without true CFG (generate() would refuse it after the queue)
        family = MODELS[model].family if model in MODELS else family_of(pipe).key
        if family != "flux":
            raise ValueError(f"true_cfg_scale is for Flux models; {model} is a {family} model, whose CFG scale is "
                             f"guidance_scale: leave true_cfg_scale at 1, got {true_cfg:g}")
    side = native_size(model, pipe) if None in sizes.values() else 0
    check_budget(model, tier_of(model, pipe), loader.device.type, sizes["width"] or side, sizes["height"] or side,
                 steps, limits, images)
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
        guidance=rec.guidance if guidance_unset else guidance.strip(),
        guidance_params=(dict(rec.guidance_params) if guidance_unset and _unset(guidance_params)
                         else parse_guidance_params(guidance_params)),
        num_images_per_prompt=images,
        true_cfg_scale=true_cfg,
    )
