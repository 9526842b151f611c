"""Models offered by default: the embedded model plus a curated list of hub ids (the UI's allow-list)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from pipelines.traced import SMALL_DENOISER_PARAMS, num_params

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class ModelEntry:
    """A model the playground offers by name."""

    key: str  # short name shown in the UI and accepted by --model
    source: str  # local diffusers folder or hub id
    family: str  # expected family key (documentation; detection is always from the loaded class)
    steps: int  # recommended num_inference_steps
    guidance_scale: float  # recommended guidance scale
    scheduler: str | None  # recommended scheduler key; None keeps the model's own
    note: str  # one line for the UI
    cuda_dtype: str = "float16"  # dtype on CUDA ("float16" or "bfloat16"); CPU always runs float32
    # JSON file in the source folder, {"words": [...]}: every word of the captions the model was trained on, for a
    # closed-vocabulary model; None: the text encoder was trained on open text. Read by model_vocabulary().
    vocabulary: str | None = None
    size: int = 512  # native side in pixels (what width/height 0 render), for budgets before the model is loaded
    # weight class for work budgets and the hardware-aware list (pipelines/limits.py): "small" (the embedded model),
    # "standard" (SD 1.x/2.x, ~1 B parameters) or "heavy" (SDXL, T5-XXL models: too big for a CPU in fp32)
    tier: str = "standard"
    guidance: str = "cfg"  # recommended guidance method (guidance/registry.py)
    guidance_params: Mapping[str, float] = field(default_factory=dict)  # its parameters, when not the defaults
    schedule: str = "discrete"  # its noise schedule (pipelines/schedulers.py kinds): "discrete" or "flow" (SD3)


MODELS: dict[str, ModelEntry] = {m.key: m for m in (
    # 20 steps of its own DPM++ 2M at CFG 3: chosen by the strict reading of 200 prompts (EVAL.md): shape 83% at
    # CFG 3, 82% at 4, 78.5% at 5 (over-saturation grows with the scale; guidance rescale did not help at 3-5).
    ModelEntry("tiny-shapes", str(ASSETS / "models" / "tiny-shapes"), "sd", 20, 3.0, None,
               "embedded 64×64 shapes model trained from scratch; runs offline on a CPU. Its words: circle, square, "
               "triangle, star, heart; red, green, blue, yellow, purple, orange, white, black; small, large; top left "
               "… bottom right; 'above', 'to the left of'; 'on a blue background' (an unnamed background is left to "
               "chance). v-prediction on a zero-terminal-SNR schedule: its first x̂0 is the blurry average",
               # Generated from shapes/world.py by training/vocabulary.py; tests/test_prompts.py keeps them equal.
               vocabulary="vocabulary.json", size=64, tier="small"),
    ModelEntry("sd-turbo", "stabilityai/sd-turbo", "sd", 1, 0.0, "euler_a", "SD 2.1 distilled; 1–4 steps, no CFG"),
    ModelEntry("sd-1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd", 30, 7.5, None, "SD 1.5, 512×512"),
    ModelEntry("sdxl-base", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", 30, 7.0, None, "SDXL base 1.0, 1024×1024",
               size=1024, tier="heavy"),
    ModelEntry("pixart-sigma-512", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "pixart_sigma", 20, 4.5, None,
               "PixArt-Σ 512 with a T5-XXL text encoder", tier="heavy"),
    ModelEntry("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", 28, 4.5, None,
               "SD 3.5 Medium, CLIP-L + CLIP-G + T5-XXL, flow matching", cuda_dtype="bfloat16",
               size=1024, tier="heavy", schedule="flow"),
    # Flux.1 (pipelines/families.py FluxFamily): CLIP-L pooled + T5-XXL, 12 B transformer, bfloat16 as the model
    # cards run it. guidance_scale is Flux's distilled guidance input (dev; schnell has none): one pass per step;
    # true CFG is the separate true_cfg_scale. Steps and scales are the model cards'.
    ModelEntry("flux.1-schnell", "black-forest-labs/FLUX.1-schnell", "flux", 4, 0.0, None,
               "FLUX.1 schnell (timestep-distilled, 1–4 steps, no guidance input), CLIP-L + T5-XXL, flow matching",
               cuda_dtype="bfloat16", size=1024, tier="heavy", schedule="flow"),
    ModelEntry("flux.1-dev", "black-forest-labs/FLUX.1-dev", "flux", 28, 3.5, None,
               "FLUX.1 dev (guidance-distilled: guidance scale is a model input, one pass; true CFG is a second pass), "
               "CLIP-L + T5-XXL, flow matching", cuda_dtype="bfloat16", size=1024, tier="heavy", schedule="flow"),
)}


def resolve(model: str) -> str:
    """A registry key -> its source; anything else (a folder or hub id) is returned unchanged."""
    entry = MODELS.get(model)
    return entry.source if entry else model


@lru_cache(maxsize=None)
def model_vocabulary(model: str) -> frozenset[str] | None:
    """The words a registry model was trained on (ModelEntry.vocabulary), or None for open-vocabulary models and
    anything outside the registry."""
    entry = MODELS.get(model)
    if entry is None or entry.vocabulary is None:
        return None
    path = Path(entry.source) / entry.vocabulary
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model {model!r}: cannot read its vocabulary {path}: {e}") from e
    words = data.get("words") if isinstance(data, dict) else None
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"model {model!r}: {path} must be an object with a non-empty list of strings under 'words'")
    return frozenset(words)


def extra_models_from_env(value: str | None = None) -> list[str]:
    """Extra allow-listed hub ids or folders from PLAYGROUND_EXTRA_MODELS (comma separated)."""
    value = os.environ.get("PLAYGROUND_EXTRA_MODELS", "") if value is None else value
    return [v.strip() for v in value.split(",") if v.strip()]


# Parameter counts that separate the tiers for models outside the registry (whole pipeline, every module): the
# embedded model has ~3 M in its denoiser (small: SMALL_DENOISER_PARAMS, pipelines/traced.py), SD 1.5 ~1.07 B in all,
# SD 2.1 ~1.3 B, SDXL ~3.5 B, PixArt-Σ with T5-XXL ~5.4 B.
HEAVY_PIPELINE_PARAMS = 2_000_000_000


def tier_of(model: str, pipe=None) -> str:
    """A model's weight class ("small", "standard", "heavy"): the registry's, else counted from the loaded pipeline
    (its denoiser under 50 M parameters: small; the whole pipeline over 2 B: heavy). None without a registry entry
    or a pipeline: "heavy", the strictest budget."""
    entry = MODELS.get(model)
    if entry is not None:
        return entry.tier
    if pipe is None:
        return "heavy"
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is not None and num_params(denoiser) < SMALL_DENOISER_PARAMS:
        return "small"
    modules = [c for c in getattr(pipe, "components", {}).values() if hasattr(c, "parameters")]
    total = sum(p.numel() for m in modules for p in m.parameters())
    return "heavy" if total > HEAVY_PIPELINE_PARAMS else "standard"


def offered_models(device: str, allow_heavy: bool, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The allow-list for a device: the registry without its heavy models unless `allow_heavy` (Limits.heavy_allowed:
    by default only on CUDA; SDXL / SD3.5 with T5-XXL in fp32 need tens of GB and minutes per step on a CPU), then
    `extra` (PLAYGROUND_EXTRA_MODELS, always offered: the operator named them)."""
    keys = [m.key for m in MODELS.values() if allow_heavy or m.tier != "heavy"]
    return list(dict.fromkeys([*keys, *extra]))
