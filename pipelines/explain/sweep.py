"""3. Sweep grid over one or two of guidance_scale, steps, scheduler, guidance (method), seed; matched seeds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from pipelines.explain.common import MAX_CELLS, Cancelled, _r, _save, _Watch, seeded
from pipelines.explain.figures import sweep_figure
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import save_image, write_json
from pipelines.requests import build_request
from pipelines.types import GenerationRequest, GenerationResult


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

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): the axes and each cell done."""
        return {"experiment": "sweep", "seed": self.request.seed, "request": self.request.to_dict(), "done": self.done,
                "x": {"name": self.x.name, "values": list(self.x.values)},
                "y": None if self.y is None else {"name": self.y.name, "values": list(self.y.values)},
                "cells": [{"row": c.row, "col": c.col, "x": c.x, "y": c.y, "settings": dict(c.settings),
                           "seed": c.result.seed, "steps_completed": c.result.steps_completed,
                           "scheduler": c.result.scheduler, "seconds": _r(c.result.timings.total, 3)}
                          for c in self.cells]}

    def write(self, out: str | Path) -> dict[str, Any]:
        """OUT/sweep.json (to_dict() and the image paths, relative to OUT), OUT/grid.png (figures.sweep_figure) and
        OUT/cells/RR_CC.png (each with its request metadata)."""
        out = Path(out)
        data = self.to_dict()
        for row, c in zip(data["cells"], self.cells):
            row["image"] = f"cells/{c.row:02d}_{c.col:02d}.png"
            save_image(out / row["image"], c.result)
        _save(out, "grid.png", sweep_figure(self))
        write_json(out / "sweep.json", data)
        return data


def _cell_request(base: GenerationRequest, loader: ModelLoader, settings: dict[str, Any]) -> GenerationRequest:
    """The base request with `settings` applied, validated by the one request builder."""
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
          cancelled: Cancelled | None = None, run_seconds: float | None = None) -> Iterator[SweepReport]:
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
        watch = _Watch(cancelled, keep=False, run_seconds=run_seconds)
        result = generate(cell, watch, loader=loader)
        if watch.stopped(result):
            return
        cells.append(SweepCell(r, c, xv, yv, settings, dataclasses.replace(cell, seed=result.seed), result))
        report = dataclasses.replace(report, cells=tuple(cells), done=len(cells) == total)
        yield report
