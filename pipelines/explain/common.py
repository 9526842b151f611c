"""What every Explain experiment shares: the step watcher, running an experiment to its end, a fixed seed,
x̂0 decoding as the model's profile says, the limits on how many runs one may make, and the numbers and images
of a report's to_dict() / write()."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
from PIL import Image

from pipelines.loading import ModelLoader
from pipelines.observers import Observer
from pipelines.outputs import save_png
from pipelines.types import GenerationRequest, GenerationResult, StepEvent


Cancelled = Callable[[], bool]  # polled at every step boundary and between runs; True stops the experiment
R = TypeVar("R")

MAX_CELLS = 64  # sweep grids larger than this are refused (each cell is a full run)
MAX_RUNS = 200  # branch / tradeoff experiments making more runs than this are refused


class _Watch(Observer):
    """Keeps every StepEvent of one run (first image, on the CPU) and cancels when `cancelled()` says so or when
    the run has taken `run_seconds` (None: no limit; the clock starts when the watch is made, just before its run)."""

    def __init__(self, cancelled: Cancelled | None = None, keep: bool = True, run_seconds: float | None = None) -> None:
        self.events: list[StepEvent] = []
        self.cancelled = cancelled
        self.keep = keep
        self.run_seconds = run_seconds
        self.deadline = None if run_seconds is None else time.monotonic() + run_seconds
        self.expired = False

    def on_step(self, event: StepEvent) -> None:
        if self.keep:
            self.events.append(event)

    def is_cancelled(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.expired = True
            return True
        return bool(self.cancelled and self.cancelled())

    def stopped(self, result: GenerationResult) -> bool:
        """After the run: whether it was stopped (the experiment ends there, keeping what it has). A run stopped by
        its time limit raises instead, saying so (a ValueError: one line for the client)."""
        if self.expired:
            raise ValueError(f"one run of the experiment took more than {self.run_seconds:g} s, the most one run may "
                             f"take here (PLAYGROUND_MAX_RUN_SECONDS); what finished before it stays")
        return result.cancelled


class Turn:
    """Time slices of a long computation inside an experiment (decoding a thousand x̂0 after a run): over() is True
    once `seconds` have passed since the last slice began, and starts the next. The experiment then yields a
    partial report, so a UI that runs each report as one job on a shared worker lets other visitors' runs in
    between (a 64²×1000 dissection held the worker 91 s in one piece)."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self.began = time.monotonic()

    def over(self) -> bool:
        now = time.monotonic()
        if now - self.began < self.seconds:
            return False
        self.began = now
        return True


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
