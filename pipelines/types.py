"""Frozen dataclasses at the edges of the generation API: the request, the per-step event, the result."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import torch
from PIL import Image

from guidance.registry import validate as _validate_guidance
from pipelines.prompts import PromptSchedule

# Key of the embedded model (trained in training/, shipped in assets/models/tiny-shapes); see pipelines/registry.py.
DEFAULT_MODEL = "tiny-shapes"

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_IMAGES_PER_PROMPT = 16  # a batch's upper bound; the work budget (pipelines/limits.py) counts the whole batch


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines an image. Field names follow diffusers' `__call__` arguments."""

    prompt: str  # text prompt as typed, A1111's [from:to:when] included; "" is valid (unconditional generation)
    negative_prompt: str = ""  # as prompt; "" means "none", exactly as diffusers' default negative_prompt=None
    model: str = DEFAULT_MODEL  # registry key (pipelines/registry.py), hub id or local diffusers folder
    scheduler: str | None = None  # key of pipelines.schedulers.SCHEDULERS; None keeps the model's own scheduler
    num_inference_steps: int = 20  # denoising steps, 1..1000
    guidance_scale: float = 7.5  # CFG scale s; <= 1 disables the unconditional pass, as in diffusers
    seed: int | None = None  # None draws a random seed; the result reports the one used
    width: int | None = None  # pixels; None takes the model's default size; must be a multiple of its factor
    height: int | None = None  # pixels; as width
    guidance: str = "cfg"  # key of guidance.registry.METHODS
    guidance_params: Mapping[str, float] = field(default_factory=dict)  # method parameters, e.g. guidance_rescale
    # (step, seed): from loop step `step` on, the scheduler's fresh noise comes from a generator re-seeded with `seed`;
    # steps before it are the run without a branch (pipelines/explain/branch.py branches a trunk this way). None: no branch.
    branch: tuple[int, int] | None = None
    # Images made in one batched run; image i uses seed + i and equals the single run with that seed (AUTOMATIC1111's
    # convention; diffusers takes a list of generators), so any image of a batch can be reproduced alone.
    num_images_per_prompt: int = 1
    # Flux only (diffusers' FluxPipeline true_cfg_scale): CFG with a second pass on the negative prompt (empty: ""),
    # on above 1, where guidance_scale is the distilled guidance the model takes as an input; 1 = off. Other families
    # refuse any other value (their CFG scale is guidance_scale).
    true_cfg_scale: float = 1.0
    # Derived, not given: the texts the encoder reads at each step, parsed from both prompts against the steps.
    schedule: PromptSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a hub id or a local diffusers folder, got an empty value")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        object.__setattr__(self, "schedule", PromptSchedule.parse(self.prompt, self.negative_prompt, steps))
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        object.__setattr__(self, "guidance_scale", float(g))
        g = self.true_cfg_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"true_cfg_scale must be a finite number >= 0 (1 = off; Flux only), got {g!r}")
        object.__setattr__(self, "true_cfg_scale", float(g))
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be an integer from 0 to 2**63-1 or None, got {self.seed!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE):
                raise ValueError(f"{name} must be an integer from 1 to {MAX_SIDE} (a multiple of the model's factor) or None, got {v!r}")
        if not isinstance(self.guidance, str):
            raise ValueError("guidance must be a method key string")
        params = dict(self.guidance_params)
        for k, v in params.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"guidance_params must map names to finite numbers, got {k!r}={v!r}")
        # A read-only copy keeps the request hashable in spirit and immune to caller mutation.
        object.__setattr__(self, "guidance_params", _FrozenParams(params))
        if self.branch is not None:
            b = tuple(self.branch) if isinstance(self.branch, (tuple, list)) else ()
            if len(b) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in b) or not (
                    0 <= b[0] < self.num_inference_steps and 0 <= b[1] < 2**63):
                raise ValueError(f"branch must be (step, seed) with step from 0 to num_inference_steps-1 "
                                 f"({self.num_inference_steps - 1}) and seed from 0 to 2**63-1, or None; got {self.branch!r}")
            object.__setattr__(self, "branch", b)
        n = self.num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES_PER_PROMPT:
            raise ValueError(f"num_images_per_prompt must be an integer from 1 to {MAX_IMAGES_PER_PROMPT}, got {n!r}")
        if self.seed is not None and self.seed + n > 2**63:
            raise ValueError(f"seed + num_images_per_prompt must stay below 2**63 (image i uses seed + i), "
                             f"got seed {self.seed} and {n} images")
        # Guidance method and parameters are validated against the registry here, once.
        _validate_guidance(self.guidance, params)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (`branch` only when set, `num_images_per_prompt` only above 1 and
        `true_cfg_scale` only when not 1, so readers of older traces see what they knew)."""
        d = asdict(self) | {"guidance_params": dict(self.guidance_params)}
        del d["schedule"]  # derived from prompt, negative_prompt and num_inference_steps
        if self.num_images_per_prompt == 1:
            del d["num_images_per_prompt"]
        if self.true_cfg_scale == 1.0:
            del d["true_cfg_scale"]
        if self.branch is None:
            del d["branch"]
        else:
            d["branch"] = list(self.branch)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def seeds(self, seed: int) -> tuple[int, ...]:
        """The seed of each image of the batch, given the run's (first) seed."""
        return tuple(seed + i for i in range(self.num_images_per_prompt))

    def image_alone(self, seed: int, index: int) -> "GenerationRequest":
        """The single-image request that makes image `index` of this batch (run with `seed`) on its own."""
        return replace(self, seed=seed + index, num_images_per_prompt=1)


class _FrozenParams(dict):
    """A dict that refuses mutation, so a frozen request stays frozen."""

    def _readonly(self, *a: Any, **k: Any) -> None:
        raise TypeError("guidance_params of a GenerationRequest is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


@dataclass(frozen=True)
class StepEvent:
    """One denoising step: what the loop hands the observer after each iteration, and the one record of a step
    everywhere else (the scrubber's recorder, trace.json, the step tensors file).

    From the loop the tensors are (B, C, h, w), detached, on the model's device. `first_image()` is the kept form
    (first image, CPU); a record read from trace.json, or thinned out by a bounded recorder, has no tensors
    (`kept` is False) and only its numbers. `previews` names the preview files a TraceWriter wrote for the step.
    """

    step: int  # 0-based index of this loop iteration
    num_steps: int  # total iterations (len(timesteps); 2N-1 for Heun)
    timestep: float  # scheduler timestep t
    sigma: float | None  # k-diffusion σ (VP models) or flow σ (flow models) at this step
    latents: torch.Tensor | None  # x_{t-1}: latents after the scheduler step, in the scheduler's space
    denoised: torch.Tensor | None  # x̂0: predicted clean latents from the guided prediction
    denoised_cond: torch.Tensor | None  # x̂0 of the conditional prediction alone (None without CFG)
    denoised_uncond: torch.Tensor | None  # x̂0 of the unconditional prediction alone (None without CFG)
    guidance_delta_norm: float | None  # ‖pred_cond − pred_uncond‖ (L2 over the first image), None without CFG
    effective_scale: float  # guidance scale applied at this step (1.0 = conditional only)
    elapsed: float  # seconds since the loop started
    previews: Mapping[str, str] = field(default_factory=dict)  # preview name -> PNG path relative to the run folder

    TENSORS = ("latents", "denoised", "denoised_cond", "denoised_uncond")  # the fields that hold tensors

    @property
    def kept(self) -> bool:
        """Whether this record holds its tensors (False for a trace's record or a thinned-out step)."""
        return self.latents is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this record holds, by field name (None fields left out)."""
        return {k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    def first_image(self, dtype: torch.dtype | None = None) -> StepEvent:
        """This step with each tensor cut to the first image of the batch, (1, C, h, w), detached, on the CPU,
        contiguous (and in `dtype` when given): what a recorder or a file keeps."""
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:1].detach().to("cpu", dtype).contiguous()

        return replace(self, **{k: cut(getattr(self, k)) for k in self.TENSORS})

    def numbers_only(self) -> StepEvent:
        """This step without its tensors."""
        return replace(self, **{k: None for k in self.TENSORS})

    def numbers(self) -> dict[str, Any]:
        """The step's numbers as trace.json records them (key order as written since the format began, then
        num_steps)."""
        return {"step": self.step, "timestep": self.timestep, "sigma": self.sigma,
                "effective_scale": self.effective_scale, "guidance_delta_norm": self.guidance_delta_norm,
                "elapsed": self.elapsed, "num_steps": self.num_steps}


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds spent in each phase of generate()."""

    load: float  # loading (or fetching from cache) the pipeline
    encode: float  # text encoding
    denoise: float  # the denoising loop, observer time included
    decode: float  # VAE decode + postprocess
    total: float  # all of the above


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of one generate() call."""

    image: Image.Image  # final image (first of the batch); for a cancelled run, the decoded last x̂0
    seed: int  # the seed actually used (the first image's; image i used seed + i)
    request: GenerationRequest  # the request as given (seed may be None there)
    timings: Timings  # per-phase wall-clock seconds
    latents: torch.Tensor  # final latents (B, C, h, w), B = request.num_images_per_prompt
    steps_completed: int  # iterations run (== num_steps unless cancelled)
    num_steps: int  # iterations planned
    cancelled: bool  # True when an observer stopped the run early
    scheduler: str  # scheduler key used (or the class name when the model's own is not in the registry)
    family: str  # model family key ("sd", "sdxl", "pixart_sigma", "sd3", "flux")
    height: int  # pixels rendered
    width: int  # pixels rendered
    images: tuple[Image.Image, ...] = ()  # every image of the batch, image i from seed + i (images[0] is `image`)
    # torch's CPU thread count during the run (None on CUDA): float sums are split per thread, so the last bit of a
    # CPU image depends on it; the copied diffusers script pins it (ui/render.py)
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.images:
            object.__setattr__(self, "images", (self.image,))

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each image: seed + i."""
        return tuple(self.seed + i for i in range(len(self.images)))
