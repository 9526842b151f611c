"""5. Diversity vs adherence: for a few guidance scales, N seeds each: prompt adherence by the shapes world's judge
(embedded model only) and diversity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from pipelines.explain.common import MAX_RUNS, Cancelled, _r, _save, _Watch, seeded
from pipelines.explain.figures import tradeoff_figure
from pipelines.explain.metrics import diversity
from pipelines.explain.sweep import _cell_request
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import write_json
from pipelines.registry import resolve
from pipelines.types import DEFAULT_MODEL, GenerationRequest
from pipelines.words import counted
from shapes.judge import Judge, prompt_targets as judge_targets


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
    """Diversity vs adherence for one prompt; grows one guidance scale at a time."""

    request: GenerationRequest  # seed = the first of the seeds
    targets: dict[str, str]  # what the prompt asks for: attribute -> value (color, shape, size, position, background)
    points: tuple[TradeoffPoint, ...]  # done so far
    scales: tuple[float, ...]  # every scale planned
    done: bool

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): the judge's targets and each scale done."""
        return {"experiment": "tradeoff", "seed": self.request.seed, "request": self.request.to_dict(),
                "done": self.done, "targets": dict(self.targets),
                "points": [{"guidance_scale": p.guidance_scale, "adherence": _r(p.adherence),
                            "all_right": _r(p.all_right), "diversity": _r(p.diversity), "seeds": list(p.seeds)}
                           for p in self.points]}

    def write(self, out: str | Path) -> dict[str, Any]:
        """OUT/tradeoff.json (to_dict() and the image paths, relative to OUT), OUT/tradeoff.png
        (figures.tradeoff_figure) and OUT/images/cfg<s>_<seed>.png."""
        out = Path(out)
        data = self.to_dict()
        for row, p in zip(data["points"], self.points):
            row["images"] = [_save(out, f"images/cfg{p.guidance_scale:g}_{s}.png", image)
                             for s, image in zip(p.seeds, p.images)]
        _save(out, "tradeoff.png", tradeoff_figure(self))
        write_json(out / "tradeoff.json", data)
        return data


def check_judge_model(model: str) -> None:
    """ValueError unless `model` is the embedded model, the only one whose images the judge can score."""
    embedded = Path(resolve(DEFAULT_MODEL)).resolve()
    if model != DEFAULT_MODEL and Path(resolve(model)).resolve() != embedded:
        raise ValueError(f"adherence is measured by the shapes world's judge, a classifier that can only "
                         f"score the embedded model {DEFAULT_MODEL!r}; {model!r} draws other things")


def tradeoff(request: GenerationRequest, scales: Sequence[float], seeds: int, *, loader: ModelLoader,
             cancelled: Cancelled | None = None, run_seconds: float | None = None) -> Iterator[TradeoffReport]:
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
        raise ValueError(f"{counted(len(scales), 'scale')} × {counted(seeds, 'seed')} is {len(scales) * seeds} runs; "
                         f"at most {MAX_RUNS}")
    seed_list = tuple((request.seed + i) % 2**63 for i in range(seeds))
    plan = [_cell_request(request, loader, {"guidance_scale": s}) for s in scales]
    judge = Judge()
    report = TradeoffReport(request, targets, (), scales, done=False)
    points: list[TradeoffPoint] = []
    for scale, cell in zip(scales, plan):
        images = []
        for s in seed_list:
            watch = _Watch(cancelled, keep=False, run_seconds=run_seconds)
            r = generate(dataclasses.replace(cell, seed=s), watch, loader=loader)
            if watch.stopped(r):
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
