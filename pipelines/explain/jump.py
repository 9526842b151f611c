"""1. Jump vs walk: every step's x̂0 of one run against its final image, then separate k-step runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from pipelines.explain.common import Cancelled, Turn, _r, _save, _Watch, _X0, seeded
from pipelines.explain.figures import jump_figure
from pipelines.explain.metrics import BANDS, band_change, rms, sharpness
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import write_json
from pipelines.types import GenerationRequest
from pipelines.words import counted


@dataclass(frozen=True)
class JumpStep:
    """One step of the full run: x̂0 as the model predicts it there ("jump now")."""

    step: int  # 0-based loop index (as trace.json); the run has done step + 1 steps here
    sigma: float | None  # noise level σ at this step
    sharpness: float  # high-frequency energy of the decoded x̂0 (see sharpness())
    distance_to_final: float  # RMS distance of the decoded x̂0 to the final image, [0, 1] pixel units
    image: np.ndarray | None  # decoded x̂0, (H, W, 3) uint8; None where the report's image budget kept only numbers
    bands: tuple[float, float, float] | None = None  # x̂0_k − x̂0_k−1 in low/mid/high frequencies (band_change); None at 0

    def band_shares(self) -> tuple[float, float, float] | None:
        """Each band's share of this step's change of x̂0 (their squares over the sum; None at the first step)."""
        if self.bands is None:
            return None
        total = sum(b * b for b in self.bands) or 1.0
        return tuple(b * b / total for b in self.bands)  # type: ignore[return-value]


@dataclass(frozen=True)
class ShortRun:
    """A separate run of only k steps ("take k big steps"), against the full run."""

    steps: int  # k, the short run's num_inference_steps
    image: Image.Image  # its final image
    sharpness: float  # of its final image
    distance_to_final: float  # RMS distance to the full run's final image
    distance_to_jump: float  # RMS distance to the full run's x̂0 after k steps (loop index k - 1)


@dataclass(frozen=True)
class JumpReport:
    """Jump vs walk for one request; grows as the short runs finish."""

    request: GenerationRequest  # the full run's request, seed filled in
    final: Image.Image  # the full run's final image ("keep walking")
    steps: tuple[JumpStep, ...]  # one per loop step of the full run
    short_runs: tuple[ShortRun, ...]  # the k-step runs done so far, in the order of `short_steps`
    short_steps: tuple[int, ...]  # every k planned
    preview: str  # how x̂0 was decoded ("decode" = the full VAE)
    done: bool  # every planned run has finished
    decoding: bool = False  # the full run's x̂0 are still being decoded: `steps` holds those so far

    def image_near(self, i: int) -> JumpStep:
        """The step with a kept x̂0 image nearest to loop index i (i itself unless the image budget thinned it)."""
        return nearest_kept(self.steps, i, lambda s: s.image is not None)

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): per step and per k-step run."""
        return {"experiment": "jump", "seed": self.request.seed, "request": self.request.to_dict(), "done": self.done,
                "preview": self.preview,
                "steps": [{"step": s.step, "sigma": _r(s.sigma), "sharpness": _r(s.sharpness),
                           "distance_to_final": _r(s.distance_to_final)} for s in self.steps],
                # coarse before fine: per step, how much x̂0 changed in each band (band_change; null at step 0)
                "bands": {name: [None if s.bands is None else _r(s.bands[j]) for s in self.steps]
                          for j, name in enumerate(BANDS)},
                "short_runs": [{"steps": r.steps, "compare_step": r.steps - 1, "sharpness": _r(r.sharpness),
                                "distance_to_final": _r(r.distance_to_final),
                                "distance_to_jump": _r(r.distance_to_jump)} for r in self.short_runs],
                "image_steps": [s.step for s in self.steps if s.image is not None]}  # steps whose x̂0 image is kept

    def write(self, out: str | Path, frames: int = 6) -> dict[str, Any]:
        """OUT/jump.json (to_dict() and the image paths, relative to OUT), OUT/jump.png (figures.jump_figure at
        `frames` steps), OUT/final.png, OUT/x0/NNN.png per kept step and OUT/short_K.png per k-step run."""
        out = Path(out)
        data = self.to_dict() | {"final": _save(out, "final.png", self.final, {"request": self.request.to_json()})}
        for row, s in zip(data["steps"], self.steps):
            row["image"] = None if s.image is None else _save(out, f"x0/{s.step:03d}.png", s.image)
        for row, r in zip(data["short_runs"], self.short_runs):
            row["image"] = _save(out, f"short_{r.steps}.png", r.image)
        _save(out, "jump.png", jump_figure(self, frame_steps(len(self.steps), frames)))
        write_json(out / "jump.json", data)
        return data


def frame_steps(num_steps: int, frames: int) -> list[int]:
    """`frames` loop indices spread evenly from the first step to the last (fewer when the run is shorter)."""
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    frames = min(frames, num_steps)  # a shorter run shows every step, its last one included
    return sorted({round(i * (num_steps - 1) / max(frames - 1, 1)) for i in range(frames)})


def kept_steps(num_steps: int, step_bytes: int, max_bytes: int | None, must: Sequence[int] = ()) -> frozenset[int]:
    """The loop indices whose decoded x̂0 images an experiment keeps: every step when they fit in `max_bytes` (None:
    no bound), else as many evenly spaced ones as fit (at least the first and the last), plus `must`."""
    if max_bytes is None or num_steps * step_bytes <= max_bytes:
        return frozenset(range(num_steps))
    return frozenset(frame_steps(num_steps, max(2, max_bytes // max(step_bytes, 1)))) | frozenset(must)


def nearest_kept(steps: Sequence[Any], i: int, has: Callable[[Any], bool]) -> Any:
    """The step nearest to loop index i (the earlier one on a tie) for which has(step) holds."""
    return min((s for s in steps if has(s)), key=lambda s: (abs(s.step - i), s.step))


def jump(request: GenerationRequest, *, loader: ModelLoader, short_steps: Sequence[int] | None = None,
         frames: int = 6, cancelled: Cancelled | None = None, max_image_bytes: int | None = None,
         run_seconds: float | None = None) -> Iterator[JumpReport]:
    """Jump vs walk: every step's x̂0 of one run against its final image, then separate k-step runs.

    short_steps: the k of the k-step runs (default: the 1-based steps of `frames` evenly spaced frames, below N).
    max_image_bytes: the decoded x̂0 images the report may hold (None: every step's). Past it, evenly spaced steps
    keep theirs (JumpReport.image_near) and the others only their numbers; a long run on a large model would
    otherwise hold hundreds of MB (200 steps of 512² images: 157 MB).
    """
    request = seeded(request)
    n = request.num_inference_steps
    if short_steps is None:
        short_steps = [k + 1 for k in frame_steps(n, frames) if k + 1 < n]
    short_steps = tuple(dict.fromkeys(int(k) for k in short_steps))
    bad = [k for k in short_steps if not 1 <= k <= n]
    if bad:
        raise ValueError(f"short runs must have from 1 to {counted(n, 'step')} (the full run's --steps), got {bad}")
    watch = _Watch(cancelled, run_seconds=run_seconds)
    result = generate(request, watch, loader=loader)
    if watch.stopped(result):
        return
    watch.deadline = None  # the run's limit is spent; decoding below stops on `cancelled` alone
    decode = _X0(request, loader)
    steps, keep, count, turn, previous = [], frozenset(), len(watch.events), Turn(), None
    for i, e in enumerate(watch.events):
        if watch.is_cancelled():  # a thousand-step run decodes a thousand x̂0: stoppable between them too
            return
        if steps and turn.over():  # a long decode gives the worker back between slices (a report of the steps so far)
            yield JumpReport(request, result.image, tuple(steps), (), short_steps, decode.kind, done=False,
                             decoding=True)
        image = decode(e.denoised)
        if i == 0:  # the k-step runs are compared with the jump after k steps: those images always stay
            keep = kept_steps(count, image.nbytes, max_image_bytes, [min(k, count) - 1 for k in short_steps])
        steps.append(JumpStep(e.step, e.sigma, sharpness(image), rms(image, result.image),
                              image if i in keep else None, None if previous is None else band_change(previous, image)))
        previous = image
    steps_t = tuple(steps)
    report = JumpReport(request, result.image, steps_t, (), short_steps, decode.kind, done=not short_steps)
    yield report
    shorts: list[ShortRun] = []
    for k in short_steps:
        short = short_run(report, k, loader=loader, cancelled=cancelled, run_seconds=run_seconds)
        if short is None:
            return
        shorts.append(short)
        report = dataclasses.replace(report, short_runs=tuple(shorts), done=len(shorts) == len(short_steps))
        yield report


def short_run(report: JumpReport, k: int, *, loader: ModelLoader, cancelled: Cancelled | None = None,
              run_seconds: float | None = None) -> ShortRun | None:
    """"Take k big steps": a separate k-step run of the report's request, against its final image and the jump after
    k steps (the nearest kept image); None when cancelled."""
    watch = _Watch(cancelled, keep=False, run_seconds=run_seconds)
    short = generate(dataclasses.replace(report.request, num_inference_steps=k), watch,
                     loader=loader)
    if watch.stopped(short):
        return None
    jumped = report.image_near(min(k, len(report.steps)) - 1).image
    return ShortRun(k, short.image, sharpness(short.image), rms(short.image, report.final), rms(short.image, jumped))
