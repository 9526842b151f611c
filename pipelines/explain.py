"""The Explain lab: experiments that show why diffusion takes many small steps, built on generate().

Every experiment is a generator over one frozen report that grows: it yields after each generate() call, so a UI
can stream partial results and stop between runs (and `cancelled` stops a run in flight at a step boundary).
`finish(experiment)` runs one to the end, as the CLI does. No second denoising loop: all steps come from
generate() and its StepEvents.

- jump: per step, the decoded x̂0 ("jump now") against the final image ("keep walking"), its sharpness and its
  distance to the final image, plus separate k-step runs ("take k big steps").
- branch: one trunk run to a fraction f of the schedule, finished N times with different noise draws
  (GenerationRequest.branch); diversity of the N endings against f.
- sweep: a grid over one or two of guidance_scale, steps, scheduler, guidance (method), seed; matched seeds.
- dissect: one run's conditional, unconditional and guided x̂0 per step, ‖ε_c − ε_u‖, the effective scale and
  how much x̂0 still moves.
- tradeoff: for a few guidance scales, N seeds each: prompt adherence (the shapes world's judge, embedded model
  only) and diversity.

Distances are RMS over RGB pixels in [0, 1]; sharpness is the mean squared Laplacian of the luminance in [0, 1]
(high-frequency energy: a blurry average has little, crisp edges a lot).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import Observer
from pipelines.types import DEFAULT_MODEL, GenerationRequest, GenerationResult, StepEvent

Cancelled = Callable[[], bool]  # polled at every step boundary and between runs; True stops the experiment
R = TypeVar("R")

MAX_CELLS = 64  # sweep grids larger than this are refused (each cell is a full run)
MAX_RUNS = 200  # branch / tradeoff experiments making more runs than this are refused


# ---- shared helpers ---------------------------------------------------------------------------------------------


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


def pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as float32 (H, W, 3) in [0, 1]."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return a.astype(np.float32) / 255.0


def rms(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """RMS difference of two images in [0, 1] pixel units."""
    return float(np.sqrt(np.mean((pixels(a) - pixels(b)) ** 2)))


def sharpness(image: Image.Image | np.ndarray) -> float:
    """High-frequency energy: mean squared 4-neighbour Laplacian of the luminance (Rec. 601) in [0, 1]."""
    y = pixels(image) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lap = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    return float(np.mean(lap ** 2))


def diversity(images: Sequence[Image.Image | np.ndarray]) -> float:
    """Mean pairwise RMS distance of images (0 when they are identical or fewer than two)."""
    arrays = [pixels(i) for i in images]
    pairs = [float(np.sqrt(np.mean((arrays[i] - arrays[j]) ** 2)))
             for i in range(len(arrays)) for j in range(i + 1, len(arrays))]
    return float(np.mean(pairs)) if pairs else 0.0


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


# ---- 1. jump vs walk --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JumpStep:
    """One step of the full run: x̂0 as the model predicts it there ("jump now")."""

    step: int  # 0-based loop index (as trace.json); the run has done step + 1 steps here
    sigma: float | None  # noise level σ at this step
    sharpness: float  # high-frequency energy of the decoded x̂0 (see sharpness())
    distance_to_final: float  # RMS distance of the decoded x̂0 to the final image, [0, 1] pixel units
    image: np.ndarray | None  # decoded x̂0, (H, W, 3) uint8; None where the report's image budget kept only numbers


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

    def image_near(self, i: int) -> JumpStep:
        """The step with a kept x̂0 image nearest to loop index i (i itself unless the image budget thinned it)."""
        return nearest_kept(self.steps, i, lambda s: s.image is not None)


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
         frames: int = 6, cancelled: Cancelled | None = None, max_image_bytes: int | None = None) -> Iterator[JumpReport]:
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
        raise ValueError(f"short runs must have from 1 to {n} steps (the full run's --steps), got {bad}")
    watch = _Watch(cancelled)
    result = generate(request, watch, loader=loader)
    if result.cancelled:
        return
    decode = _X0(request, loader)
    steps, keep, count = [], frozenset(), len(watch.events)
    for i, e in enumerate(watch.events):
        if watch.is_cancelled():  # a thousand-step run decodes a thousand x̂0: stoppable between them too
            return
        image = decode(e.denoised)
        if i == 0:  # the k-step runs are compared with the jump after k steps: those images always stay
            keep = kept_steps(count, image.nbytes, max_image_bytes, [min(k, count) - 1 for k in short_steps])
        steps.append(JumpStep(e.step, e.sigma, sharpness(image), rms(image, result.image),
                              image if i in keep else None))
    steps_t = tuple(steps)
    report = JumpReport(request, result.image, steps_t, (), short_steps, decode.kind, done=not short_steps)
    yield report
    shorts: list[ShortRun] = []
    for k in short_steps:
        short = generate(dataclasses.replace(request, num_inference_steps=k), _Watch(cancelled, keep=False),
                         loader=loader)
        if short.cancelled:
            return
        jumped = steps_t[min(k, len(steps_t)) - 1].image
        shorts.append(ShortRun(k, short.image, sharpness(short.image), rms(short.image, result.image),
                               rms(short.image, jumped)))
        report = dataclasses.replace(report, short_runs=tuple(shorts), done=len(shorts) == len(short_steps))
        yield report


# ---- 2. branching -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchPoint:
    """N endings of one trunk, branched at one point of the schedule."""

    fraction: float  # f, where in the schedule the branches split (0 = at the start, before the first step)
    step: int  # loop index from which the branch noise is drawn: round(f · N), below N
    seeds: tuple[int, ...]  # the branches' noise seeds (the same for every fraction)
    images: tuple[Image.Image, ...]  # the branches' final images
    diversity: float  # mean pairwise RMS distance of those images


@dataclass(frozen=True)
class BranchReport:
    """Branching for one request; grows one branch point at a time."""

    request: GenerationRequest  # the trunk's request, seed and scheduler as run
    trunk: Image.Image  # the trunk run to the end without branching
    stochastic: bool  # whether the scheduler draws fresh noise in its steps (if not, every branch is the trunk)
    scheduler: str  # scheduler key used
    points: tuple[BranchPoint, ...]  # done so far, in the order asked
    at: tuple[float, ...]  # every fraction planned
    done: bool


def branch_seed(seed: int, j: int) -> int:
    """The j-th branch's noise seed: fixed for a trunk seed, different from it and from the other branches'."""
    return (seed * 1_000_003 + 7_919 * (j + 1)) % 2**63


def branch(request: GenerationRequest, at: Sequence[float], branches: int, *, loader: ModelLoader,
           cancelled: Cancelled | None = None) -> Iterator[BranchReport]:
    """Run the trunk to each fraction f of the schedule, then finish it `branches` times with different noise.

    Exact: the trunk is deterministic for its seed, so each branch re-runs it and, from step round(f · N) on,
    draws the scheduler's noise from its own seed (GenerationRequest.branch); the multistep history stays right.
    """
    from pipelines.schedulers import is_stochastic

    request = seeded(request)
    at = tuple(float(f) for f in at)
    if not at:
        raise ValueError("give at least one branch point (--at), e.g. 0.1,0.5,0.9")
    bad = [f for f in at if not 0.0 <= f < 1.0]
    if bad:
        raise ValueError(f"branch points are fractions of the schedule from 0 up to (not including) 1, got {bad}")
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 2:
        raise ValueError(f"branches must be a whole number of at least 2 (diversity compares endings), got {branches!r}")
    if len(at) * branches > MAX_RUNS:
        raise ValueError(f"{len(at)} branch points × {branches} branches is {len(at) * branches} runs; "
                         f"at most {MAX_RUNS}")
    pipe, key = loader.view(request.model, request.scheduler)
    stochastic = is_stochastic(pipe.scheduler)
    trunk = generate(request, _Watch(cancelled, keep=False), loader=loader)
    if trunk.cancelled:
        return
    n = trunk.num_steps
    seeds = tuple(branch_seed(trunk.seed, j) for j in range(branches))
    report = BranchReport(request, trunk.image, stochastic, trunk.scheduler, (), at, done=False)
    points: list[BranchPoint] = []
    for f in at:
        step = min(n - 1, round(f * request.num_inference_steps))
        images = []
        for s in seeds:
            r = generate(dataclasses.replace(request, branch=(step, s)), _Watch(cancelled, keep=False), loader=loader)
            if r.cancelled:
                return
            images.append(r.image)
        points.append(BranchPoint(f, step, seeds, tuple(images), diversity(images)))
        report = dataclasses.replace(report, points=tuple(points), done=len(points) == len(at))
        yield report


# ---- 3. sweep grid ----------------------------------------------------------------------------------------------

# Axis name (CLI / UI) -> (request field, value type). "steps" is num_inference_steps, "guidance" the method.
AXES: dict[str, tuple[str, type]] = {
    "guidance_scale": ("guidance_scale", float),
    "steps": ("num_inference_steps", int),
    "scheduler": ("scheduler", str),
    "guidance": ("guidance", str),
    "seed": ("seed", int),
}
_AXIS_ALIASES = {"num_inference_steps": "steps", "cfg": "guidance_scale", "method": "guidance"}


@dataclass(frozen=True)
class Axis:
    """One axis of a sweep: a setting and the values it takes, in order."""

    name: str  # key of AXES
    values: tuple[Any, ...]  # typed values (float, int or str)

    @property
    def field(self) -> str:
        return AXES[self.name][0]

    def label(self, value: Any) -> str:
        return f"{self.name} {value:g}" if isinstance(value, float) else f"{self.name} {value}"


def parse_axis(text: str) -> Axis:
    """'guidance_scale=1,3,7.5' -> Axis; ValueError naming the axes or the bad value."""
    name, sep, values = text.partition("=")
    name = _AXIS_ALIASES.get(name.strip(), name.strip())
    if not sep or name not in AXES:
        raise ValueError(f"an axis is NAME=V1,V2,... with NAME one of {', '.join(AXES)}; got {text!r}")
    cast = AXES[name][1]
    out = []
    for v in (v.strip() for v in values.split(",")):
        if not v:
            continue
        try:
            if cast is int:
                f = float(v)
                if not f.is_integer():
                    raise ValueError
                out.append(int(f))
            else:
                out.append(cast(v))
        except ValueError:
            raise ValueError(f"{name} values must be {'whole numbers' if cast is int else 'numbers'}, got {v!r}") from None
    if not out:
        raise ValueError(f"axis {name} has no values; give them as {name}=V1,V2,...")
    if len(set(out)) != len(out):
        raise ValueError(f"axis {name} repeats a value: {values!r}")
    return Axis(name, tuple(out))


@dataclass(frozen=True)
class SweepCell:
    """One cell of the grid."""

    row: int  # index along y (0 when there is no y axis)
    col: int  # index along x
    x: Any  # the x axis value
    y: Any  # the y axis value, None without a y axis
    settings: dict[str, Any]  # the request fields this cell sets ({field: value})
    request: GenerationRequest  # the cell's request, seed filled in
    result: GenerationResult  # its run

    @property
    def image(self) -> Image.Image:
        return self.result.image


@dataclass(frozen=True)
class SweepReport:
    """A sweep grid; grows cell by cell, row-major (every x of the first y, then the next y)."""

    request: GenerationRequest  # the base request, seed filled in
    x: Axis
    y: Axis | None
    cells: tuple[SweepCell, ...]  # done so far
    done: bool

    @property
    def total(self) -> int:
        return len(self.x.values) * (len(self.y.values) if self.y else 1)


def _cell_request(base: GenerationRequest, loader: ModelLoader, settings: dict[str, Any]) -> GenerationRequest:
    """The base request with `settings` applied, validated by the one request builder."""
    from pipelines.requests import build_request

    values = dict(prompt=base.prompt, negative_prompt=base.negative_prompt, model=base.model, scheduler=base.scheduler,
                  num_inference_steps=base.num_inference_steps, guidance_scale=base.guidance_scale, seed=base.seed,
                  width=base.width, height=base.height, guidance=base.guidance,
                  guidance_params=dict(base.guidance_params))
    if "guidance" in settings and settings["guidance"] != base.guidance:
        values["guidance_params"] = {}  # another method: its own defaults (the base's parameters are for its method)
    try:
        return build_request(loader=loader, **(values | settings))
    except ValueError as e:
        described = ", ".join(f"{k}={v}" for k, v in settings.items())
        raise ValueError(f"sweep cell {described}: {e}") from None


def sweep(request: GenerationRequest, x: Axis, y: Axis | None = None, *, loader: ModelLoader,
          cancelled: Cancelled | None = None) -> Iterator[SweepReport]:
    """Every combination of the x (and y) values, all with the request's seed unless an axis is the seed.

    Every cell is validated before the first run, so a bad value fails at once with the cell it belongs to.
    """
    request = seeded(request)
    if y is not None and y.name == x.name:
        raise ValueError(f"the x and y axes are both {x.name}; pick two different settings")
    total = len(x.values) * (len(y.values) if y else 1)
    if total > MAX_CELLS:
        raise ValueError(f"a {total}-cell grid is too large; at most {MAX_CELLS} cells")
    plan = []
    for r, yv in enumerate(y.values if y else [None]):
        for c, xv in enumerate(x.values):
            settings = {x.field: xv} | ({y.field: yv} if y else {})
            cell = _cell_request(request, loader, settings)
            plan.append((r, c, xv, yv, settings, cell))
    for scheduler in dict.fromkeys(p[5].scheduler for p in plan):
        loader.view(request.model, scheduler)  # an unknown or unfit scheduler fails here, before any run
    report = SweepReport(request, x, y, (), done=False)
    cells: list[SweepCell] = []
    for r, c, xv, yv, settings, cell in plan:
        result = generate(cell, _Watch(cancelled, keep=False), loader=loader)
        if result.cancelled:
            return
        cells.append(SweepCell(r, c, xv, yv, settings, dataclasses.replace(cell, seed=result.seed), result))
        report = dataclasses.replace(report, cells=tuple(cells), done=len(cells) == total)
        yield report


# ---- 4. guidance dissection -------------------------------------------------------------------------------------


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

    def images_near(self, i: int) -> DissectStep:
        """The step with kept images nearest to loop index i (i itself unless the image budget thinned it)."""
        return nearest_kept(self.steps, i, lambda s: s.x0 is not None)


def dissect(request: GenerationRequest, *, loader: ModelLoader, cancelled: Cancelled | None = None,
            max_image_bytes: int | None = None) -> Iterator[DissectReport]:
    """Per step of one run: the conditional, unconditional and guided x̂0 and the guidance numbers.

    max_image_bytes: the decoded images the report may hold (None: every step's three); past it, evenly spaced
    steps keep theirs (DissectReport.images_near) and the others only their numbers."""
    request = seeded(request)
    watch = _Watch(cancelled)
    result = generate(request, watch, loader=loader)
    if result.cancelled:
        return
    decode = _X0(request, loader)
    steps, previous, keep = [], None, frozenset()
    for i, e in enumerate(watch.events):
        if watch.is_cancelled():
            return
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


# ---- 5. diversity vs adherence ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TradeoffPoint:
    """N seeds at one guidance scale."""

    guidance_scale: float
    seeds: tuple[int, ...]
    images: tuple[Image.Image, ...]
    adherence: float  # mean over images of the fraction of the prompt's attributes the judge finds right, [0, 1]
    all_right: float  # fraction of images with every named attribute right
    diversity: float  # mean pairwise RMS distance of the images


@dataclass(frozen=True)
class TradeoffReport:
    request: GenerationRequest  # seed = the first of the seeds
    targets: dict[str, str]  # what the prompt asks for: attribute -> value (color, shape, size, position, background)
    points: tuple[TradeoffPoint, ...]  # done so far
    scales: tuple[float, ...]  # every scale planned
    done: bool


def judge_targets(prompt: str) -> dict[str, str]:
    """The attributes of a one-object shapes-world prompt the judge can check; ValueError if it cannot score it."""
    from shapes import world

    text = " " + re.sub(r"[^a-z ]+", " ", prompt.lower().replace("-", " ")) + " "
    text = re.sub(r"\s+", " ", text)
    out: dict[str, str] = {}
    bg = re.search(r"(?: on an? | )(\w+) background ", text)
    if bg and bg.group(1) in world.COLORS:
        out["background"] = bg.group(1)
        text = text[:bg.start()] + " " + text[bg.end():]
    if any(f" {r} " in text for r in world.RELATIONS):
        raise ValueError("the judge scores one-object prompts; this one relates two objects")
    shapes = [s for s in world.SHAPES if re.search(rf" {s}s? ", text)]
    if len(shapes) != 1:
        raise ValueError(f"the judge scores prompts that name one shape ({', '.join(world.SHAPES)}); "
                         f"{'none' if not shapes else ', '.join(shapes)} found in {prompt!r}")
    out["shape"] = shapes[0]
    colors = [c for c in world.COLORS if f" {c} " in text]
    if len(colors) > 1:
        raise ValueError(f"the judge scores one-object prompts; {prompt!r} names several colours ({', '.join(colors)})")
    if colors:
        out["color"] = colors[0]
    sizes = [s for s in world.SIZES if f" {s} " in text]
    if len(sizes) == 1:
        out["size"] = sizes[0]
    phrases = sorted(((p.replace("-", " "), pos) for pos, ps in world._POS_PHRASES.items() for p in ps),
                     key=lambda t: -len(t[0]))
    for phrase, pos in phrases:
        if f" {phrase} " in text:
            out["position"] = pos
            break
    return out


def check_judge_model(model: str) -> None:
    """ValueError unless `model` is the embedded model, the only one whose images the judge can score."""
    from pipelines.registry import resolve

    embedded = Path(resolve(DEFAULT_MODEL)).resolve()
    if model != DEFAULT_MODEL and Path(resolve(model)).resolve() != embedded:
        raise ValueError(f"adherence is measured by the shapes world's judge (shapes/judge.py), which can only "
                         f"score the embedded model {DEFAULT_MODEL!r}; {model!r} draws other things")


def tradeoff(request: GenerationRequest, scales: Sequence[float], seeds: int, *, loader: ModelLoader,
             cancelled: Cancelled | None = None) -> Iterator[TradeoffReport]:
    """For each guidance scale, `seeds` images (seeds s, s+1, ...): the judge's adherence and the diversity."""
    check_judge_model(request.model)
    targets = judge_targets(request.prompt)
    request = seeded(request)
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("give at least one guidance scale, e.g. 1,3,7.5")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"seeds must be a whole number of at least 2 (diversity compares images), got {seeds!r}")
    if len(scales) * seeds > MAX_RUNS:
        raise ValueError(f"{len(scales)} scales × {seeds} seeds is {len(scales) * seeds} runs; at most {MAX_RUNS}")
    seed_list = tuple((request.seed + i) % 2**63 for i in range(seeds))
    plan = [_cell_request(request, loader, {"guidance_scale": s}) for s in scales]
    from shapes.judge import Judge

    judge = Judge()
    report = TradeoffReport(request, targets, (), scales, done=False)
    points: list[TradeoffPoint] = []
    for scale, cell in zip(scales, plan):
        images = []
        for s in seed_list:
            r = generate(dataclasses.replace(cell, seed=s), _Watch(cancelled, keep=False), loader=loader)
            if r.cancelled:
                return
            images.append(r.image)
        scores = []
        for v in judge.batch(images):
            hits = [v.found and getattr(v, k) == want for k, want in targets.items()]
            scores.append(sum(hits) / len(hits))
        points.append(TradeoffPoint(scale, seed_list, tuple(images), float(np.mean(scores)),
                                    float(np.mean([s == 1.0 for s in scores])), diversity(images)))
        report = dataclasses.replace(report, points=tuple(points), done=len(points) == len(scales))
        yield report


# ---- pictures ---------------------------------------------------------------------------------------------------


def _pil(image: np.ndarray | Image.Image) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")


def grid_image(rows: Sequence[Sequence[np.ndarray | Image.Image | None]], *, col_labels: Sequence[str] = (),
               row_labels: Sequence[str] = (), title: str = "", x_title: str = "", y_title: str = "",
               min_side: int = 128) -> Image.Image:
    """A labelled grid of images (None leaves a cell blank), small ones enlarged nearest-neighbour so pixels stay
    crisp. Column labels go above the columns, row labels left of the rows; ASCII text (PIL's default font)."""
    first = next(_pil(i) for row in rows for i in row if i is not None)
    w, h = first.size
    zoom = max(1, -(-min_side // max(w, h)))
    cw, ch, pad = w * zoom, h * zoom, 6
    draw0 = ImageDraw.Draw(first)
    text_w = lambda s: int(draw0.textlength(s)) if s else 0  # noqa: E731
    left = max([text_w(s) for s in row_labels] + [0]) + (2 * pad if row_labels else 0) + (16 if y_title else 0)
    top = (18 if title else 0) + (16 if x_title else 0) + (16 if col_labels else 0) + pad
    ncols = max(len(r) for r in rows)
    width = max(left + ncols * (cw + pad) + pad, text_w(title) + 2 * pad)
    canvas = Image.new("RGB", (width, top + len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y0 = 4
    if title:
        draw.text((pad, y0), title, fill="black")
        y0 += 18
    if x_title:
        draw.text((left + (ncols * (cw + pad) - text_w(x_title)) // 2, y0), x_title, fill="#444")
        y0 += 16
    for c, label in enumerate(col_labels):
        draw.text((left + c * (cw + pad) + max(0, (cw - text_w(label)) // 2), y0), label, fill="black")
    if y_title:
        label = Image.new("RGB", (max(1, text_w(y_title)), 12), "white")
        ImageDraw.Draw(label).text((0, 0), y_title, fill="#444")
        label = label.rotate(90, expand=True)
        canvas.paste(label, (2, top + max(0, (len(rows) * (ch + pad) - label.height) // 2)))
    for r, row in enumerate(rows):
        y = top + r * (ch + pad)
        if r < len(row_labels):
            draw.text((left - pad - text_w(row_labels[r]), y + ch // 2 - 6), row_labels[r], fill="black")
        for c, image in enumerate(row):
            if image is not None:
                canvas.paste(_pil(image).resize((cw, ch), Image.NEAREST), (left + c * (cw + pad), y))
    return canvas


def grid(images: Sequence[np.ndarray | Image.Image], labels: Sequence[str], *, min_side: int = 192,
         title: str = "") -> Image.Image:
    """A labelled row of images (grid_image with one row, labels above)."""
    return grid_image([list(images)], col_labels=labels, title=title, min_side=min_side)


def line_chart(xs: Sequence[float], series: dict[str, Sequence[float | None]], *, title: str = "",
               x_label: str = "", size: tuple[int, int] = (420, 200)) -> Image.Image:
    """A small line chart, each series scaled to its own maximum (the legend gives each one's range)."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    width, height = size
    left, right, top, bottom = 10, 10, 18 + 14 * len(series), 28
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 2), title, fill="black")
    x_lo, x_hi = min(xs), max(xs)
    span = (x_hi - x_lo) or 1.0
    px = lambda x: left + (x - x_lo) / span * (width - left - right)  # noqa: E731
    draw.line([(left, height - bottom), (width - right, height - bottom)], fill="#888")
    draw.text((left, height - bottom + 4), f"{x_lo:g}", fill="#444")
    draw.text((width - right - 30, height - bottom + 4), f"{x_hi:g}", fill="#444")
    draw.text((width // 2 - int(draw.textlength(x_label)) // 2, height - bottom + 14), x_label, fill="#444")
    for i, (name, ys) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        vals = [v for v in ys if v is not None]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        draw.text((left, 16 + 14 * i), f"{name}: {lo:.3g} to {hi:.3g}", fill=colour)
        top_v = hi if hi > 0 else 1.0
        py = lambda v: height - bottom - max(0.0, v) / top_v * (height - top - bottom)  # noqa: E731
        points = [(px(x), py(v)) for x, v in zip(xs, ys) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p in points:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
    return canvas


def stack(*images: Image.Image) -> Image.Image:
    """Images one above the other on white, left-aligned."""
    width = max(i.width for i in images)
    canvas = Image.new("RGB", (width, sum(i.height for i in images)), "white")
    y = 0
    for i in images:
        canvas.paste(i, (0, y))
        y += i.height
    return canvas


# ---- files: images + one JSON per experiment (the CLI writes these; paths in the JSON are relative to `out`) ---------


def _r(x: float | None, digits: int = 6) -> float | str | None:
    """A number for JSON: rounded; "inf" / "nan" as strings (σ is ∞ at a zero-terminal-SNR model's first step)."""
    if x is None:
        return None
    return round(float(x), digits) if math.isfinite(x) else str(float(x))


def write_jump(report: JumpReport, out: str | Path, frames: int = 6) -> dict[str, Any]:
    """DIR/jump.json, DIR/jump.png (x̂0 at `frames` steps above the k-step runs, the final image, a chart),
    DIR/final.png, DIR/x0/NNN.png per step and DIR/short_K.png per k-step run."""
    from pipelines.outputs import save_png, write_json

    out = Path(out)
    n = len(report.steps)
    steps = []
    for s in report.steps:
        path = save_png(out / "x0" / f"{s.step:03d}.png", s.image)
        steps.append({"step": s.step, "sigma": _r(s.sigma), "sharpness": _r(s.sharpness),
                      "distance_to_final": _r(s.distance_to_final), "image": str(path.relative_to(out))})
    save_png(out / "final.png", report.final, {"request": report.request.to_json()})
    shorts = []
    for r in report.short_runs:
        path = save_png(out / f"short_{r.steps}.png", r.image)
        shorts.append({"steps": r.steps, "compare_step": r.steps - 1, "sharpness": _r(r.sharpness),
                       "distance_to_final": _r(r.distance_to_final), "distance_to_jump": _r(r.distance_to_jump),
                       "image": path.name})
    picks = frame_steps(n, frames)
    by_k = {r.steps: r for r in report.short_runs}
    top = [report.steps[k].image for k in picks] + [report.final]
    bottom = [by_k[k + 1].image if k + 1 in by_k else None for k in picks] + [None]
    labels = [f"{k + 1} of {n}, d={report.steps[k].distance_to_final:.2f}" for k in picks] + ["final"]
    pictures = grid_image([top, bottom], col_labels=labels, row_labels=["jump now: x0 at step k", "a k-step run"],
                          title=f"{report.request.prompt!r}, seed {report.request.seed}: jump from step k, or take k "
                                f"big steps, or keep walking (d = RMS distance to the final image)")
    chart = line_chart([s.step + 1 for s in report.steps],
                       {"distance to final": [s.distance_to_final for s in report.steps],
                        "x0 sharpness": [s.sharpness for s in report.steps]},
                       title="per step of the full run", x_label="step", size=(max(420, pictures.width // 2), 200))
    save_png(out / "jump.png", stack(pictures, chart))
    data = {"seed": report.request.seed, "request": report.request.to_dict(), "preview": report.preview,
            "final": "final.png", "steps": steps, "short_runs": shorts}
    write_json(out / "jump.json", data)
    return data


def write_branch(report: BranchReport, out: str | Path) -> dict[str, Any]:
    """DIR/branch.json, DIR/grid.png (a row per branch point, a column per noise seed), DIR/trunk.png and
    DIR/branches/f<f>_<j>.png."""
    from pipelines.outputs import save_png, write_json

    out = Path(out)
    images = []
    for p in report.points:
        row = []
        for j, image in enumerate(p.images):
            row.append(str(save_png(out / "branches" / f"f{p.fraction:.2f}_{j}.png", image).relative_to(out)))
        images.append(row)
    save_png(out / "trunk.png", report.trunk, {"request": report.request.to_json()})
    n = report.request.num_inference_steps
    rows = [[report.trunk, *p.images] for p in report.points]
    kind = "stochastic" if report.stochastic else "deterministic: no noise after the start, so every branch is the same"
    pictures = grid_image(rows, col_labels=["no branch"] + [f"noise {j + 1}" for j in range(len(report.points[0].images))],
                          row_labels=[f"f={p.fraction:g} (step {p.step} of {n}) div={p.diversity:.3f}"
                                      for p in report.points],
                          title=f"{report.request.prompt!r}, seed {report.request.seed}, {report.scheduler} ({kind})",
                          x_title="branches: same x_t at f, different noise draws afterwards", y_title="branch point f")
    parts = [pictures]
    if len(report.points) > 1:
        parts.append(line_chart([p.fraction for p in report.points], {"diversity": [p.diversity for p in report.points]},
                                title="diversity of the endings against the branch point", x_label="f"))
    save_png(out / "grid.png", stack(*parts))
    data = {"seed": report.request.seed, "scheduler": report.scheduler, "stochastic": report.stochastic,
            "request": report.request.to_dict(), "at": [p.fraction for p in report.points],
            "steps": [p.step for p in report.points], "branch_seeds": list(report.points[0].seeds) if report.points else [],
            "diversity": [_r(p.diversity) for p in report.points], "images": images, "trunk": "trunk.png"}
    write_json(out / "branch.json", data)
    return data


def write_sweep(report: SweepReport, out: str | Path) -> dict[str, Any]:
    """DIR/sweep.json, DIR/grid.png (labelled axes) and DIR/cells/RR_CC.png (each with its request metadata)."""
    from pipelines.outputs import save_image, save_png, write_json

    out = Path(out)
    cells = []
    for c in report.cells:
        path = save_image(out / "cells" / f"{c.row:02d}_{c.col:02d}.png", c.result)
        cells.append({"row": c.row, "col": c.col, "x": c.x, "y": c.y, "settings": dict(c.settings), "seed": c.result.seed,
                      "steps_completed": c.result.steps_completed, "scheduler": c.result.scheduler,
                      "seconds": _r(c.result.timings.total, 3), "image": str(path.relative_to(out))})
    x, y = report.x, report.y
    rows: list[list[Any]] = [[None] * len(x.values) for _ in (y.values if y else [None])]
    for c in report.cells:
        rows[c.row][c.col] = c.image
    pictures = grid_image(rows, col_labels=[x.label(v) for v in x.values],
                          row_labels=[y.label(v) for v in y.values] if y else [],
                          title=f"{report.request.prompt!r}" + ("" if "seed" in (x.name, y.name if y else "") else
                                                               f", seed {report.request.seed} in every cell"),
                          x_title=f"x: {x.name}", y_title=f"y: {y.name}" if y else "")
    save_png(out / "grid.png", pictures)
    data = {"seed": report.request.seed, "request": report.request.to_dict(),
            "x": {"name": x.name, "values": list(x.values)},
            "y": None if y is None else {"name": y.name, "values": list(y.values)}, "cells": cells}
    write_json(out / "sweep.json", data)
    return data


def write_dissect(report: DissectReport, out: str | Path, frames: int = 6) -> dict[str, Any]:
    """DIR/dissect.json, DIR/dissect.png (guided / conditional / unconditional x̂0 at `frames` steps and charts)
    and DIR/steps/NNN_{x0,cond,uncond}.png."""
    from pipelines.outputs import save_png, write_json

    out = Path(out)
    steps = []
    for s in report.steps:
        images = {"x0": str(save_png(out / "steps" / f"{s.step:03d}_x0.png", s.x0).relative_to(out))}
        for name, image in (("cond", s.x0_cond), ("uncond", s.x0_uncond)):
            if image is not None:
                images[name] = str(save_png(out / "steps" / f"{s.step:03d}_{name}.png", image).relative_to(out))
        steps.append({"step": s.step, "timestep": _r(s.timestep, 3), "sigma": _r(s.sigma), "guided": s.guided,
                      "guidance_delta_norm": _r(s.guidance_delta_norm), "effective_scale": _r(s.effective_scale),
                      "x0_change": _r(s.x0_change), "images": images})
    save_png(out / "final.png", report.final, {"request": report.request.to_json()})
    n = len(report.steps)
    picks = frame_steps(n, frames)
    rows = [[report.steps[k].x0_cond for k in picks], [report.steps[k].x0_uncond for k in picks],
            [report.steps[k].x0 for k in picks]]
    if all(i is None for i in rows[0]):
        rows = rows[2:]
    pictures = grid_image(rows, col_labels=[f"step {k + 1} of {n}" for k in picks],
                          row_labels=(["conditional x0", "unconditional x0"] if len(rows) == 3 else []) + ["guided x0"],
                          title=f"{report.request.prompt!r}, seed {report.request.seed}, {report.request.guidance} "
                                f"scale {report.request.guidance_scale:g}"
                                + ("" if report.interval is None else
                                   f"; guidance on at steps {report.interval[0] + 1}-{report.interval[1] + 1} only"))
    xs = [s.step + 1 for s in report.steps]
    chart = line_chart(xs, {"|eps_c - eps_u|": [s.guidance_delta_norm for s in report.steps],
                            "effective scale": [s.effective_scale for s in report.steps],
                            "|x0_k - x0_k-1|": [s.x0_change for s in report.steps]},
                       title="per step", x_label="step", size=(max(420, pictures.width // 2), 220))
    save_png(out / "dissect.png", stack(pictures, chart))
    data = {"seed": report.request.seed, "request": report.request.to_dict(), "preview": report.preview,
            "interval": None if report.interval is None else list(report.interval), "final": "final.png",
            "steps": steps}
    write_json(out / "dissect.json", data)
    return data


def write_tradeoff(report: TradeoffReport, out: str | Path) -> dict[str, Any]:
    """DIR/tradeoff.json, DIR/tradeoff.png (a row per guidance scale, a chart) and DIR/images/cfg<s>_<seed>.png."""
    from pipelines.outputs import save_png, write_json

    out = Path(out)
    points = []
    for p in report.points:
        paths = [str(save_png(out / "images" / f"cfg{p.guidance_scale:g}_{s}.png", im).relative_to(out))
                 for s, im in zip(p.seeds, p.images)]
        points.append({"guidance_scale": p.guidance_scale, "adherence": _r(p.adherence), "all_right": _r(p.all_right),
                       "diversity": _r(p.diversity), "seeds": list(p.seeds), "images": paths})
    wanted = ", ".join(f"{k} {v}" for k, v in report.targets.items())
    pictures = grid_image([list(p.images) for p in report.points], col_labels=[f"seed {s}" for s in report.points[0].seeds],
                          row_labels=[f"CFG {p.guidance_scale:g}: adh {p.adherence:.2f} div {p.diversity:.3f}"
                                      for p in report.points], min_side=96,
                          title=f"{report.request.prompt!r}: the judge checks {wanted}", y_title="guidance scale")
    parts = [pictures]
    if len(report.points) > 1:
        parts.append(line_chart([p.guidance_scale for p in report.points],
                                {"adherence": [p.adherence for p in report.points],
                                 "diversity": [p.diversity for p in report.points]},
                                title="adherence (judge) and diversity against the guidance scale",
                                x_label="guidance scale"))
    save_png(out / "tradeoff.png", stack(*parts))
    data = {"request": report.request.to_dict(), "targets": report.targets, "points": points}
    write_json(out / "tradeoff.json", data)
    return data
