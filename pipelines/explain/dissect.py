"""4. Guidance dissection: one run's conditional, unconditional and guided x̂0 per step, ‖ε_c − ε_u‖, the
effective scale and how much x̂0 still moves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from pipelines.explain.common import Cancelled, Turn, _r, _save, _Watch, _X0, seeded
from pipelines.explain.figures import dissect_figure
from pipelines.explain.jump import frame_steps, kept_steps, nearest_kept
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import write_json
from pipelines.types import GenerationRequest


@dataclass(frozen=True)
class DissectStep:
    """What guidance did at one step."""

    step: int  # 0-based loop index
    timestep: float  # scheduler timestep t
    sigma: float | None  # noise level σ
    guided: bool  # whether this step ran the unconditional pass (False outside a guidance interval, or scale <= 1)
    guidance_delta_norm: float | None  # ‖ε_c − ε_u‖ (None without the unconditional pass)
    effective_scale: float  # the scale applied (1.0 = conditional only)
    x0_change: float | None  # ‖x̂0_k − x̂0_{k−1}‖ over the latents (None at the first step): how much x̂0 still moves
    x0: np.ndarray | None  # decoded guided x̂0, (H, W, 3) uint8; None where the image budget kept only numbers
    x0_cond: np.ndarray | None  # decoded conditional x̂0 (None without the unconditional pass, or not kept)
    x0_uncond: np.ndarray | None  # decoded unconditional x̂0


@dataclass(frozen=True)
class DissectReport:
    """Guidance dissection of one run."""

    request: GenerationRequest  # seed filled in
    final: Image.Image
    steps: tuple[DissectStep, ...]
    interval: tuple[int, int] | None  # first and last guided loop index when guidance is off on some steps
    preview: str  # how x̂0 was decoded
    done: bool
    decoding: bool = False  # the x̂0 are still being decoded: `steps` holds those so far

    def images_near(self, i: int) -> DissectStep:
        """The step with kept images nearest to loop index i (i itself unless the image budget thinned it)."""
        return nearest_kept(self.steps, i, lambda s: s.x0 is not None)

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): what guidance did at each step."""
        return {"experiment": "dissect", "seed": self.request.seed, "request": self.request.to_dict(),
                "done": self.done, "preview": self.preview,
                "interval": None if self.interval is None else list(self.interval),
                "steps": [{"step": s.step, "timestep": _r(s.timestep, 3), "sigma": _r(s.sigma), "guided": s.guided,
                           "guidance_delta_norm": _r(s.guidance_delta_norm), "effective_scale": _r(s.effective_scale),
                           "x0_change": _r(s.x0_change)} for s in self.steps],
                "image_steps": [s.step for s in self.steps if s.x0 is not None]}  # steps whose images are kept

    def write(self, out: str | Path, frames: int = 6) -> dict[str, Any]:
        """OUT/dissect.json (to_dict() and the image paths, relative to OUT), OUT/dissect.png (figures.dissect_figure
        at `frames` steps), OUT/final.png and OUT/steps/NNN_{x0,cond,uncond}.png per kept step."""
        out = Path(out)
        data = self.to_dict() | {"final": _save(out, "final.png", self.final, {"request": self.request.to_json()})}
        for row, s in zip(data["steps"], self.steps):
            images = {"x0": s.x0, "cond": s.x0_cond, "uncond": s.x0_uncond}
            row["images"] = {name: _save(out, f"steps/{s.step:03d}_{name}.png", image)
                             for name, image in images.items() if image is not None}
        _save(out, "dissect.png", dissect_figure(self, frame_steps(len(self.steps), frames)))
        write_json(out / "dissect.json", data)
        return data


def dissect(request: GenerationRequest, *, loader: ModelLoader, cancelled: Cancelled | None = None,
            max_image_bytes: int | None = None, run_seconds: float | None = None) -> Iterator[DissectReport]:
    """Per step of one run: the conditional, unconditional and guided x̂0 and the guidance numbers.

    max_image_bytes: the decoded images the report may hold (None: every step's three); past it, evenly spaced
    steps keep theirs (DissectReport.images_near) and the others only their numbers."""
    request = seeded(request)
    watch = _Watch(cancelled, run_seconds=run_seconds)
    result = generate(request, watch, loader=loader)
    if watch.stopped(result):
        return
    watch.deadline = None  # the run's limit is spent; decoding below stops on `cancelled` alone
    decode = _X0(request, loader)
    steps, previous, keep, turn = [], None, frozenset(), Turn()
    for i, e in enumerate(watch.events):
        if watch.is_cancelled():
            return
        if steps and turn.over():  # a long decode gives the worker back between slices (a report of the steps so far)
            yield DissectReport(request, result.image, tuple(steps), None, decode.kind, done=False, decoding=True)
        guided = e.denoised_uncond is not None
        change = None if previous is None else float((e.denoised[0] - previous[0]).float().norm())
        x0 = decode(e.denoised) if i == 0 or i in keep else None  # step 0 is always kept
        if i == 0:  # the size of one decoded image; three a step where guidance runs
            keep = kept_steps(len(watch.events), 3 * x0.nbytes, max_image_bytes)
        kept = x0 is not None
        steps.append(DissectStep(
            e.step, e.timestep, e.sigma, guided, e.guidance_delta_norm, e.effective_scale, change, x0,
            decode(e.denoised_cond) if guided and kept else None, decode(e.denoised_uncond) if guided and kept else None))
        previous = e.denoised
    on = [s.step for s in steps if s.guided]
    interval = (on[0], on[-1]) if on and len(on) < len(steps) else None
    yield DissectReport(request, result.image, tuple(steps), interval, decode.kind, done=True)
