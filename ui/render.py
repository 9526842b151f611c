"""Rendering helpers shared by the views (no Gradio): arrays for the browser, heat maps, the stock-diffusers script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from guidance.registry import METHODS
from pipelines.registry import resolve
from pipelines.schedulers import SCHEDULERS
from pipelines.types import GenerationRequest, GenerationResult

# Previews are upscaled (nearest neighbour) to at least this many pixels on the server, and the rest of the way in
# the browser (CSS image-rendering: pixelated): a 256-pixel PNG cost ~16x the encoding and transfer of a 64-pixel
# one, on the CPU the denoising loop needs.
PREVIEW_SIDE = 64


def upscale(image: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the shorter side reaches `side` (tiny latents stay crisp)."""
    factor = max(1, side // max(1, min(image.shape[:2])))
    return image.repeat(factor, 0).repeat(factor, 1) if factor > 1 else image


def heat(diff: np.ndarray, top: float) -> np.ndarray:
    """A (h, w) map of non-negative values -> (h, w, 3) uint8, black -> red -> yellow -> white, `top` at white."""
    x = np.clip(diff / top if top > 0 else np.zeros_like(diff), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def guidance_map(cond: torch.Tensor, uncond: torch.Tensor) -> np.ndarray:
    """|x̂0_cond − x̂0_uncond| of the first image, averaged over latent channels: (1, C, h, w) -> (h, w)."""
    return (cond[0].float() - uncond[0].float()).abs().mean(0).numpy()


def display_source(model: str) -> str:
    """What from_pretrained should be given to reproduce `model`: the hub id, or the folder's absolute path
    (so the copied script runs from any working directory)."""
    source = resolve(model)
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


def diffusers_code(result: GenerationResult, dtype: torch.dtype, device: str) -> str:
    """A short stock-diffusers script that reproduces `result` (plain CFG and CFG rescale exactly)."""
    return diffusers_script(result.request, seed=result.seed, width=result.width, height=result.height,
                            scheduler=result.scheduler, family=result.family,
                            stopped_at=result.steps_completed if result.cancelled else None, dtype=dtype, device=device)


def diffusers_script(req: GenerationRequest, *, seed: int, width: int, height: int, scheduler: str, family: str,
                     stopped_at: int | None, dtype: torch.dtype, device: str) -> str:
    """diffusers_code() from a run's resolved settings, as a result or its trace.json records them."""
    lines = ["import torch", "from diffusers import DiffusionPipeline"]
    spec = SCHEDULERS.get(scheduler) if req.scheduler is not None else None
    if spec is not None:
        lines[-1] += f", {spec.cls.__name__}"
    dtype_arg = "" if dtype == torch.float32 else f", dtype=torch.{str(dtype).removeprefix('torch.')}"
    lines += ["", f"pipe = DiffusionPipeline.from_pretrained({display_source(req.model)!r}{dtype_arg}).to({device!r})"]
    if spec is not None:
        overrides = "".join(f", {k}={v!r}" for k, v in spec.overrides.items())
        lines.append(f"pipe.scheduler = {spec.cls.__name__}.from_config(pipe.scheduler.config{overrides})")
    args = [f"prompt={req.prompt!r}"]
    if req.negative_prompt:
        args.append(f"negative_prompt={req.negative_prompt!r}")
    args += [
        f"num_inference_steps={req.num_inference_steps}",
        f"guidance_scale={req.guidance_scale:g}",
        f"width={width}",
        f"height={height}",
        f'generator=torch.Generator("cpu").manual_seed({seed})',
    ]
    note = None
    if req.guidance == "rescale":
        phi = req.guidance_params.get("guidance_rescale", METHODS["rescale"].params[0].default)
        args.append(f"guidance_rescale={phi:g}")
    elif req.guidance != "cfg":
        note = f"# Stock __call__ has no '{req.guidance}' guidance: same settings with plain CFG (a different image)."
    if family == "pixart_sigma":
        args.append("use_resolution_binning=False")
    if stopped_at is not None:
        stopped = f"# The playground run was stopped at step {stopped_at}; this one runs to the end."
        note = f"{note}\n{stopped}" if note else stopped
    call = "image = pipe(\n" + "".join(f"    {a},\n" for a in args) + ").images[0]"
    return "\n".join(lines + ([note] if note else []) + [call, 'image.save("image.png")']) + "\n"
