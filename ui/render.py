"""Rendering helpers shared by the views (no Gradio): arrays for the browser, heat maps, the stock-diffusers script."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffusers import (
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)

from guidance.registry import METHODS
from pipelines.families import FAMILIES
from pipelines.registry import resolve
from pipelines.schedulers import SCHEDULERS
from pipelines.types import GenerationRequest, GenerationResult

# Previews are upscaled (nearest neighbour) to at least this many pixels on the server, and the rest of the way in
# the browser (CSS image-rendering: pixelated): a 256-pixel PNG cost ~16x the encoding and transfer of a 64-pixel
# one, on the CPU the denoising loop needs.
PREVIEW_SIDE = 64
ROOT = Path(__file__).resolve().parent.parent  # the playground's repository


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
    """Where `model` comes from, as a visitor may see it and as the copied script gives it to from_pretrained: the hub
    id; a folder inside the playground's repository relative to its root (`assets/models/tiny-shapes`: the script
    runs from a checkout's root); any other folder by its name alone. Never an absolute path on the server."""
    source = resolve(model)
    path = Path(source).expanduser()
    if not path.is_dir():
        return source
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def diffusers_code(result: GenerationResult, dtype: torch.dtype, device: str) -> str:
    """A short stock-diffusers script that reproduces `result`: the same pixels for CFG, CFG rescale and PAG on the
    same machine (see diffusers_script)."""
    return diffusers_script(result.request, seed=result.seed, width=result.width, height=result.height,
                            scheduler=result.scheduler, family=result.family,
                            stopped_at=result.steps_completed if result.cancelled else None, dtype=dtype, device=device,
                            threads=result.threads)


def diffusers_script(req: GenerationRequest, *, seed: int, width: int, height: int, scheduler: str, family: str,
                     stopped_at: int | None, dtype: torch.dtype, device: str, threads: int | None = None) -> str:
    """diffusers_code() from a run's resolved settings, as a result or its trace.json records them.

    Plain CFG and CFG rescale go through the model's own pipeline class; PAG through diffusers' PAG pipeline of the
    family (AutoPipelineForText2Image with enable_pag=True, on the layers ours perturbs: families.py pag_layers).
    `threads`: torch's CPU thread count during the run. The script pins it, because float sums are split per thread
    and the last bit of a pixel follows (the embedded model's default run on 1 thread against 2: one level on one
    to three pixels for 7 of 12 prompt/seed pairs); None (a GPU run, or a trace from before it was recorded) pins
    nothing. A batch gets one generator per image, seeded seed + i, as the playground runs it.
    """
    pag = req.guidance == "pag"
    pipeline_cls = "AutoPipelineForText2Image" if pag else "DiffusionPipeline"
    lines = ["import torch", f"from diffusers import {pipeline_cls}"]
    spec = SCHEDULERS.get(scheduler) if req.scheduler is not None else None
    if spec is not None:
        lines[-1] += f", {spec.cls.__name__}"
    lines.append("")
    if threads is not None and threads >= 1 and device == "cpu":
        lines.append(f"torch.set_num_threads({threads})  # as the playground's run: float sums depend on the count")
    source = display_source(req.model)
    folder = Path(resolve(req.model)).expanduser()
    if folder.is_dir():
        lines.append(f"# {source!r} is the model's folder in the playground's repository: run this from a checkout's "
                     "root." if folder.resolve().is_relative_to(ROOT) else
                     f"# {source!r} is a model folder on the playground's server: put a copy of it beside this script.")
    dtype_arg = "" if dtype == torch.float32 else f", dtype=torch.{str(dtype).removeprefix('torch.')}"
    pag_args = ""
    if pag:
        pag_args = f", enable_pag=True, pag_applied_layers={list(FAMILIES[family].pag_layers)!r}"
    lines.append(f"pipe = {pipeline_cls}.from_pretrained({source!r}{dtype_arg}{pag_args}).to({device!r})")
    if spec is not None:
        overrides = "".join(f", {k}={v!r}" for k, v in spec.overrides.items())
        lines.append(f"pipe.scheduler = {spec.cls.__name__}.from_config(pipe.scheduler.config{overrides})")
    prompt, negative = req.schedule.pairs[0]  # a prompt schedule's first texts; the callback below switches them
    args = [f"prompt={prompt!r}"]
    if negative:
        args.append(f"negative_prompt={negative!r}")
    args += [
        f"num_inference_steps={req.num_inference_steps}",
        f"guidance_scale={_num(req.guidance_scale)}",
        f"width={width}",
        f"height={height}",
    ]
    n = req.num_images_per_prompt
    if n == 1:
        args.append(f'generator=torch.Generator("cpu").manual_seed({seed})')
    else:
        args += [f"num_images_per_prompt={n}",
                 f'generator=[torch.Generator("cpu").manual_seed({seed} + i) for i in range({n})]']
    note = None
    if req.guidance == "rescale":
        phi = req.guidance_params.get("guidance_rescale", _default("rescale", "guidance_rescale"))
        args.append(f"guidance_rescale={_num(phi)}")
    elif pag:
        args.append(f"pag_scale={_num(req.guidance_params.get('pag_scale', _default('pag', 'pag_scale')))}")
        adaptive = req.guidance_params.get("pag_adaptive_scale", _default("pag", "pag_adaptive_scale"))
        if adaptive and family == "pixart_sigma":  # its _get_pag_scale compares a batch of timesteps: an error
            note = (f"# diffusers' PixArtSigmaPAGPipeline fails with pag_adaptive_scale: this runs a constant "
                    f"pag_scale (the playground ran pag_adaptive_scale={_num(adaptive)}: a different image).")
        elif adaptive:
            args.append(f"pag_adaptive_scale={_num(adaptive)}")
    elif req.guidance != "cfg":
        note = f"# Stock __call__ has no '{req.guidance}' guidance: same settings with plain CFG (a different image)."
    if family == "pixart_sigma":
        args.append("use_resolution_binning=False")
    if req.schedule.scheduled:
        switch, switch_args, switch_note = prompt_switch(req, family, pag)
        lines += switch
        args += switch_args
        note = f"{note}\n{switch_note}" if note and switch_note else note or switch_note
    if stopped_at is not None:
        stopped = f"# The playground run was stopped at step {stopped_at}; this one runs to the end."
        note = f"{note}\n{stopped}" if note else stopped
    call = "(\n" + "".join(f"    {a},\n" for a in args) + ")"
    if n == 1:
        end = [f"image = pipe{call}.images[0]", 'image.save("image.png")']
    else:  # the playground's names: image.png, image_1.png, …
        end = [f"images = pipe{call}.images", "for i, image in enumerate(images):",
               '    image.save("image.png" if i == 0 else f"image_{i}.png")']
    return "\n".join(lines + ([note] if note else []) + end) + "\n"


def _default(method: str, param: str) -> float:
    """The registry's default of a guidance method's parameter."""
    return next(p.default for p in METHODS[method].params if p.name == param)


def _num(value: float) -> str:
    """A number as Python source that reads back as the same float (7.5, 3, 0.30000000000000004), never rounded:
    a scale cut to 6 digits would make another image."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


# What a prompt schedule's callback hands back, per family: the text tensors its stock loop reads (its
# _callback_tensor_inputs must list them; PixArt-Σ's __call__ has no callback_on_step_end at all), and how the
# family's encode_prompt is called for them (as pipelines/families.py calls it).
_SWITCHED = {
    "sd": (("prompt_embeds",), "cond, uncond = pipe.encode_prompt(prompt, pipe.device, {n}, cfg, negative)"),
    "sdxl": (("prompt_embeds", "add_text_embeds"),
             "cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(\n"
             "        prompt, device=pipe.device, num_images_per_prompt={n}, do_classifier_free_guidance=cfg,\n"
             "        negative_prompt=negative)"),
    "sd3": (("prompt_embeds", "pooled_prompt_embeds"),
            "cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(\n"
            "        prompt=prompt, prompt_2=None, prompt_3=None, device=pipe.device, num_images_per_prompt={n},\n"
            "        do_classifier_free_guidance=cfg, negative_prompt=negative, max_sequence_length=256)"),
}
_STOCK_CLASSES = {("sd", False): StableDiffusionPipeline, ("sd", True): StableDiffusionPAGPipeline,
                  ("sdxl", False): StableDiffusionXLPipeline, ("sdxl", True): StableDiffusionXLPAGPipeline,
                  ("sd3", False): StableDiffusion3Pipeline, ("sd3", True): StableDiffusion3PAGPipeline}


def prompt_switch(req: GenerationRequest, family: str, pag: bool) -> tuple[list[str], list[str], str | None]:
    """For a prompt schedule ([from:to:when], pipelines/prompts.py), which stock diffusers does not read: (script
    lines defining a callback_on_step_end that hands the stock loop the next texts' embeddings at the end of the step
    before they apply, its __call__ arguments, a note when the family's stock pipeline cannot take them)."""
    schedule = req.schedule
    typed = [f"# The prompt as typed: {req.prompt!r}"] + (
        [f"# The negative prompt as typed: {req.negative_prompt!r}"] if len(schedule.negative_prompt) > 1 else [])
    stock = _STOCK_CLASSES.get((family, pag))
    switched, encode = _SWITCHED.get(family, ((), ""))
    if stock is None or not set(switched) <= set(stock._callback_tensor_inputs):
        name = f"Stock {stock.__name__}" if stock is not None else "The stock pipeline of this family"
        return typed, [], (f"# {name} lets no callback swap the text embeddings a prompt schedule "
                           f"switches:\n# this runs the first texts throughout (a different image).")
    texts = {first: schedule.pairs[index] for first, index in schedule.starts[1:]}
    names = ("uncond", "cond") if len(switched) == 1 else ("uncond", "cond", "uncond_pooled", "pooled")
    returned = ", ".join(f'"{name}": batched({names[2 * k]}, {names[2 * k + 1]}, cfg)'
                         for k, name in enumerate(switched))
    if pag:
        batched = ['    """The text batch as the stock PAG loop builds it: [uncond, cond, cond] with CFG, [cond, cond] '
                   'without."""', "    return torch.cat([uncond, cond, cond]) if cfg else torch.cat([cond, cond])"]
    else:
        batched = ['    """The text batch as the stock loop builds it: [uncond, cond] with CFG, cond alone without."""',
                   "    return torch.cat([uncond, cond]) if cfg else cond"]
    lines = typed + [
        "# Stock diffusers reads no [from:to:when]: at the end of step i the callback hands the loop the embeddings",
        "# of the texts that apply from step i + 1 (the playground's loop switches them there, as A1111 does).",
        "switch_at = {" + ", ".join(f"{first}: ({p!r}, {n or None!r})" for first, (p, n) in texts.items()) + "}",
        "",
        "",
        "def batched(uncond, cond, cfg):",
        *batched,
        "",
        "",
        "def switch_prompt(pipe, i, t, tensors):",
        "    if i + 1 not in switch_at:",
        "        return {}",
        "    prompt, negative = switch_at[i + 1]",
        "    cfg = pipe.do_classifier_free_guidance",
        "    " + encode.format(n=req.num_images_per_prompt),
        "    return {" + returned + "}",
        "",
        "",
    ]
    return lines, ["callback_on_step_end=switch_prompt", f"callback_on_step_end_tensor_inputs={list(switched)!r}"], None
