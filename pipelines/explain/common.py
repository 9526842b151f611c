"""What every Explain experiment shares: the step watcher, running an experiment to its end, a fixed seed,
x̂0 decoding as the model's profile says, the limits on how many runs one may make, and the numbers and images
of a report's to_dict() / write()."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image

from pipelines.loading import ModelLoader
from pipelines.observers import Observer
from pipelines.outputs import save_png
from pipelines.types import GenerationRequest, StepEvent


Cancelled = Callable[[], bool]  # polled at every step boundary and between runs; True stops the experiment
R = TypeVar("R")

MAX_CELLS = 64  # sweep grids larger than this are refused (each cell is a full run)
MAX_RUNS = 200  # branch / tradeoff experiments making more runs than this are refused


class _Watch(Observer):
    """Keeps every StepEvent of one run (first image, on the CPU) and cancels when `cancelled()` says so."""

    def __init__(self, cancelled: Cancelled | None = None, keep: bool = True) -> None:
        self.events: list[StepEvent] = []
        self.cancelled = cancelled
        self.keep = keep

    def on_step(self, event: StepEvent) -> None:
        if self.keep:
            self.events.append(event)

    def is_cancelled(self) -> bool:
        return bool(self.cancelled and self.cancelled())


def finish(experiment: Iterator[R]) -> R:
    """Run an experiment to its end and return its last report."""
    report = None
    for report in experiment:
        pass
    if report is None:
        raise ValueError("the experiment was stopped before its first result")
    return report


def seeded(request: GenerationRequest) -> GenerationRequest:
    """The request with its seed fixed (a random one drawn once), so every run of an experiment shares it."""
    return request if request.seed is not None else dataclasses.replace(request, seed=random.randrange(2**32))


class _X0:
    """Decodes x̂0 latents of one model as its profile says experiments do (the full VAE for small images, else
    the model's fast preview), or as `kind` names."""

    def __init__(self, request: GenerationRequest, loader: ModelLoader, kind: str = "auto") -> None:
        self.previewer = loader.previewer(request.model)
        profile = loader.profile(request.model)
        side = profile.native_size
        area = (request.width or side) * (request.height or side)
        self.kind = profile.previews.experiment_x0(area) if kind == "auto" else profile.previews.kind(kind)

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return self.previewer.render(self.kind, latents)


def _r(x: float | None, digits: int = 6) -> float | str | None:
    """A number for JSON: rounded; "inf" / "nan" as strings (σ is ∞ at a zero-terminal-SNR model's first step)."""
    if x is None:
        return None
    return round(float(x), digits) if math.isfinite(x) else str(float(x))


def _save(out: Path, name: str, image: Image.Image | np.ndarray, text: dict[str, str] | None = None) -> str:
    """Write `image` as the PNG out/name and return `name`, the path the experiment's JSON gives it."""
    save_png(out / name, image, text)
    return name
