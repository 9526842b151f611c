"""Experiments that explain diffusion, built on generate(): guidance sweeps, step sweeps, and the "jump".

- sweep: the same seed and settings at several guidance scales (or step counts), side by side.
- jump: what the model predicts as the clean image (x̂0) at each step, against where the loop ends up:
  early x̂0 is a blurry average of every image that fits the prompt; many small steps commit to one.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.previews import Previewer
from pipelines.types import GenerationRequest, GenerationResult

SWEEP_FIELDS = ("guidance_scale", "num_inference_steps")


def sweep(request: GenerationRequest, field: str, values: Sequence[float | int], *,
          loader: ModelLoader) -> list[GenerationResult]:
    """One result per value of `field` (guidance_scale or num_inference_steps), all with the same seed."""
    if field not in SWEEP_FIELDS:
        raise ValueError(f"can sweep {', '.join(SWEEP_FIELDS)}, not {field!r}")
    if not values:
        raise ValueError("give at least one value to sweep")
    seed = request.seed if request.seed is not None else random.randrange(2**32)
    cast = int if field == "num_inference_steps" else float
    return [generate(dataclasses.replace(request, seed=seed, **{field: cast(v)}), loader=loader) for v in values]


@dataclass(frozen=True)
class JumpFrame:
    """The clean image the model predicts at one step, and how far it still is from the final image."""

    step: int  # loop index
    sigma: float | None  # noise level at that step
    image: np.ndarray  # decoded x̂0, (H, W, 3) uint8
    distance: float  # RMS difference to the final image, in [0, 1] pixel units


def jump(request: GenerationRequest, *, loader: ModelLoader, frames: int = 6) -> tuple[list[JumpFrame], GenerationResult]:
    """Decoded x̂0 at `frames` evenly spaced steps of one run, each with its distance to the final image."""
    observer = CollectingObserver()
    result = generate(request, observer, loader=loader)
    pipe, _ = loader.view(request.model, request.scheduler)
    previewer = Previewer(pipe)
    final = np.asarray(result.image.convert("RGB"), dtype=np.float32) / 255.0
    n = len(observer.events)
    picks = sorted({round(i * (n - 1) / max(frames - 1, 1)) for i in range(min(frames, n))})
    out = []
    for k in picks:
        event = observer.events[k]
        image = previewer.decode(event.denoised)
        distance = float(np.sqrt(np.mean((image.astype(np.float32) / 255.0 - final) ** 2)))
        out.append(JumpFrame(event.step, event.sigma, image, distance))
    return out, result


def grid(images: Sequence[np.ndarray | Image.Image], labels: Sequence[str], *, min_side: int = 192,
         title: str = "") -> Image.Image:
    """A labelled row of images, small ones enlarged with nearest-neighbour so pixels stay crisp."""
    pil = [Image.fromarray(i) if isinstance(i, np.ndarray) else i.convert("RGB") for i in images]
    w, h = pil[0].size
    zoom = max(1, -(-min_side // max(w, h)))
    cell_w, cell_h, label_h, pad = w * zoom, h * zoom, 18, 6
    top = 22 if title else 0
    canvas = Image.new("RGB", (len(pil) * (cell_w + pad) + pad, top + cell_h + label_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black")
    for i, (img, label) in enumerate(zip(pil, labels)):
        x = pad + i * (cell_w + pad)
        canvas.paste(img.resize((cell_w, cell_h), Image.NEAREST), (x, top + pad))
        draw.text((x, top + pad + cell_h + 3), label, fill="black")
    return canvas
