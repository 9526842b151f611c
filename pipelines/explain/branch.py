"""2. Branching: one trunk run to a fraction f of the schedule, finished N times with different noise draws."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from pipelines.explain.common import MAX_RUNS, Cancelled, _r, _save, _Watch, _X0, seeded
from pipelines.explain.figures import branch_figure
from pipelines.explain.metrics import diversity, pixels
from pipelines.generate import Snapshot, generate
from pipelines.loading import ModelLoader
from pipelines.outputs import write_json
from pipelines.schedulers import is_stochastic
from pipelines.types import GenerationRequest
from pipelines.words import counted


@dataclass(frozen=True)
class BranchPoint:
    """N endings of one trunk, branched at one point of the schedule."""

    fraction: float  # f, where in the schedule the branches split (0 = at the start, before the first step)
    step: int  # loop index from which the branch noise is drawn: round(f · N), below N
    seeds: tuple[int, ...]  # the branches' noise seeds (the same for every fraction)
    images: tuple[Image.Image, ...]  # the branches' final images
    diversity: float  # mean pairwise RMS distance of those images
    mean: np.ndarray | None = None  # pixel mean of the endings, (H, W, 3) uint8: a blend of where the run can still go
    x0: np.ndarray | None = None  # the trunk's decoded x̂0 at this step (from the shared x_t), (H, W, 3) uint8
    x0_to_mean: float | None = None  # RMS distance of x̂0 to the (unrounded) mean of the endings, [0, 1] pixel units


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

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): per branch point done, its step and diversity."""
        return {"experiment": "branch", "seed": self.request.seed, "request": self.request.to_dict(), "done": self.done,
                "scheduler": self.scheduler, "stochastic": self.stochastic, "at": [p.fraction for p in self.points],
                "steps": [p.step for p in self.points],
                "branch_seeds": list(self.points[0].seeds) if self.points else [],
                "diversity": [_r(p.diversity) for p in self.points],
                # x̂0 estimates the mean of the endings: how far it is from the mean of these N, per branch point
                "x0_to_mean": [_r(p.x0_to_mean) for p in self.points]}

    def write(self, out: str | Path) -> dict[str, Any]:
        """OUT/branch.json (to_dict() and the image paths, relative to OUT), OUT/grid.png (figures.branch_figure),
        OUT/trunk.png and OUT/branches/f<f>_<j>.png."""
        out = Path(out)
        data = self.to_dict() | {
            "images": [[_save(out, f"branches/f{p.fraction:.2f}_{j}.png", image) for j, image in enumerate(p.images)]
                       for p in self.points],
            "trunk": _save(out, "trunk.png", self.trunk, {"request": self.request.to_json()}),
            "means": [None if p.mean is None else _save(out, f"means/f{p.fraction:.2f}.png", p.mean)
                      for p in self.points],
            "x0": [None if p.x0 is None else _save(out, f"x0/f{p.fraction:.2f}.png", p.x0) for p in self.points]}
        _save(out, "grid.png", branch_figure(self))
        write_json(out / "branch.json", data)
        return data


def branch_seed(seed: int, j: int) -> int:
    """The j-th branch's noise seed: fixed for a trunk seed, different from it and from the other branches'."""
    return (seed * 1_000_003 + 7_919 * (j + 1)) % 2**63


def branch(request: GenerationRequest, at: Sequence[float], branches: int, *, loader: ModelLoader,
           cancelled: Cancelled | None = None, run_seconds: float | None = None) -> Iterator[BranchReport]:
    """Run the trunk to each fraction f of the schedule, then finish it `branches` times with different noise.

    Per branch point, the pixel mean of the endings beside the trunk's decoded x̂0 at the branch step and their RMS
    distance: x̂0 estimates that mean (a blend of the possible endings); each walk picks one ending.

    Exact and without re-running the trunk: the trunk keeps a Snapshot (x_t and a copy of the scheduler's state, so
    a multistep history stays right) before each branch step round(f · N), and each branch continues one from there,
    drawing the scheduler's noise from its own seed (GenerationRequest.branch): the same images as re-running the
    trunk with that branch, at the cost of the steps after the branch point only.
    """
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
        raise ValueError(f"{counted(len(at), 'branch point')} × {counted(branches, 'branch', 'branches')} is "
                         f"{len(at) * branches} runs; "
                         f"at most {MAX_RUNS}")
    pipe, key = loader.view(request.model, request.scheduler)
    stochastic = is_stochastic(pipe.scheduler)
    n_req = request.num_inference_steps
    snapshots: dict[int, Snapshot] = {}
    watch = _Watch(cancelled, run_seconds=run_seconds)  # keeps the trunk's x̂0 of every step
    trunk = generate(request, watch, loader=loader,
                     snapshot=({min(n_req - 1, round(f * n_req)) for f in at}, lambda s: snapshots.setdefault(s.step, s)))
    if watch.stopped(trunk):
        return
    decode, events = _X0(request, loader), watch.events
    n = trunk.num_steps
    seeds = tuple(branch_seed(trunk.seed, j) for j in range(branches))
    report = BranchReport(request, trunk.image, stochastic, trunk.scheduler, (), at, done=False)
    points: list[BranchPoint] = []
    for f in at:
        step = min(n - 1, round(f * request.num_inference_steps))
        images = []
        for s in seeds:
            watch = _Watch(cancelled, keep=False, run_seconds=run_seconds)
            r = generate(dataclasses.replace(request, branch=(step, s)), watch, loader=loader,
                         start=snapshots.get(step))  # none if the run has fewer steps than asked: a re-run, as exact
            if watch.stopped(r):
                return
            images.append(r.image)
        mean = np.mean([pixels(i) for i in images], axis=0)  # (H, W, 3) in [0, 1]
        x0 = decode(events[step].denoised)  # predicted from the x_t every branch shares
        points.append(BranchPoint(f, step, seeds, tuple(images), diversity(images),
                                  (mean * 255).round().astype(np.uint8), x0, float(np.sqrt(np.mean((pixels(x0) - mean) ** 2)))))
        report = dataclasses.replace(report, points=tuple(points), done=len(points) == len(at))
        yield report
