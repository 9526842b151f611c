"""Files a run leaves behind: PNG with A1111 `parameters` + request JSON, trace.json, per-step previews.

Every file is written atomically (temporary name, then rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from pipelines.observers import Observer
from pipelines.previews import Previewer
from pipelines.schedulers import SCHEDULERS
from pipelines.types import GenerationRequest, GenerationResult, StepEvent


def a1111_parameters(request: GenerationRequest, result: GenerationResult) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt, 'Negative prompt:' line, then 'Key: value, ...'."""
    spec = SCHEDULERS.get(result.scheduler)
    fields: list[tuple[str, Any]] = [
        ("Steps", request.num_inference_steps),
        ("Sampler", spec.label if spec else result.scheduler),
    ]
    if spec is not None and spec.key == "dpmpp_2m_karras":
        fields.append(("Schedule type", "Karras"))
    fields += [
        ("CFG scale", f"{request.guidance_scale:g}"),
        ("Seed", result.seed),
        ("Size", f"{result.width}x{result.height}"),
        ("Model", Path(request.model).name if os.sep in request.model and os.path.isdir(request.model) else request.model),
    ]
    if request.guidance != "cfg":
        params = " ".join(f"{k}={v:g}" for k, v in sorted(request.guidance_params.items()))
        fields.append(("Guidance", f"{request.guidance} {params}".strip()))
    if "guidance_rescale" in request.guidance_params:
        fields.append(("CFG Rescale phi", f"{request.guidance_params['guidance_rescale']:g}"))
    if result.cancelled:
        fields.append(("Stopped at step", result.steps_completed))
    text = _one_line(request.prompt)
    if request.negative_prompt:
        text += f"\nNegative prompt: {_one_line(request.negative_prompt)}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in fields)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(path: str | os.PathLike, image: Image.Image | np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically, with optional tEXt chunks."""
    path = Path(path)
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    _atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))
    return path


def save_image(path: str | os.PathLike, result: GenerationResult) -> Path:
    """The final image with A1111 `parameters` and the full request (plus seed used) as JSON in `request`."""
    request_json = json.dumps(result.request.to_dict() | {"seed": result.seed}, sort_keys=True)
    return save_png(path, result.image, {"parameters": a1111_parameters(result.request, result), "request": request_json})


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))
    return path


class TraceWriter(Observer):
    """Writes per-step previews under out_dir/steps/ as the run goes, and trace.json + image.png at the end.

    previews: which images to write each step, as {name: (source, kind)} with source one of
    "latents", "denoised", "denoised_cond", "denoised_uncond" and kind a Previewer kind.
    """

    DEFAULT_PREVIEWS = {"latents": ("latents", "rgb"), "x0": ("denoised", "decode")}

    def __init__(self, out_dir: str | os.PathLike, previewer: Previewer,
                 previews: dict[str, tuple[str, str]] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.previewer = previewer
        wanted = previews if previews is not None else self.DEFAULT_PREVIEWS
        # A model without an RGB map falls back, visibly in trace.json, to its channel grid.
        self.previews = {name: (src, kind if kind in previewer.kinds else "channels") for name, (src, kind) in wanted.items()}
        self.steps: list[dict[str, Any]] = []

    def on_step(self, event: StepEvent) -> None:
        entry: dict[str, Any] = {
            "step": event.step,
            "timestep": event.timestep,
            "sigma": event.sigma,
            "effective_scale": event.effective_scale,
            "guidance_delta_norm": event.guidance_delta_norm,
            "elapsed": round(event.elapsed, 4),
            "previews": {},
        }
        for name, (source, kind) in self.previews.items():
            latents = getattr(event, source)
            if latents is None:
                continue
            rel = f"steps/{event.step:03d}_{name}.png"
            save_png(self.out_dir / rel, self.previewer.render(kind, latents))
            entry["previews"][name] = rel
        self.steps.append(entry)

    def finish(self, result: GenerationResult) -> dict[str, Any]:
        """Write image.png and trace.json; return the trace."""
        save_image(self.out_dir / "image.png", result)
        trace = {
            "image": "image.png",
            "seed": result.seed,
            "request": result.request.to_dict() | {"seed": result.seed},
            "scheduler": result.scheduler,
            "family": result.family,
            "width": result.width,
            "height": result.height,
            "cancelled": result.cancelled,
            "timings": {k: round(v, 4) for k, v in vars(result.timings).items()},
            "preview_kinds": {name: kind for name, (_, kind) in self.previews.items()},
            "latent_format": self.previewer.format.name,
            "steps": self.steps,
        }
        write_json(self.out_dir / "trace.json", trace)
        return trace
