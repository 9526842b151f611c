"""7. When is the layout decided? One prompt schedule [from:to:when] (pipelines/prompts.py) run with its switch at
several points of the schedule, the same seed(s) in every column; the shapes world's judge reads each image
(embedded model only) and says whether it shows what `from` asked for or what `to` asked for.

A switch changes only what the run has not settled yet: where a late switch no longer changes what the judge reads,
that attribute was decided before it. On the embedded model (20 steps of its DPM++ 2M, seeds 0-5) position and
size are settled by the first quarter, the colour around the middle, the outline (circle or triangle) only in the
last two steps: coarse before fine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, ImageDraw

from pipelines.explain.common import MAX_RUNS, Cancelled, _save, _Watch, seeded
from pipelines.explain.figures import grid_image, line_chart, stack
from pipelines.explain.tradeoff import check_judge_model
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import save_image, write_json
from pipelines.prompts import switch_at
from pipelines.types import GenerationRequest, GenerationResult
from pipelines.words import counted
from shapes.judge import Judge, Verdict, prompt_targets

SWITCH_POINTS = (0.0, 0.1, 0.25, 0.5, 0.85, 1.0)  # fractions of the steps (the CLI's and the UI's default)
MAX_POINTS = 12
CELL_SIDE = 128  # pixels of a cell in the figure (small images enlarged nearest-neighbour)
READS = ("from", "to", "neither")  # what a cell shows: `from`'s value of every attribute that changes, `to`'s, or not


def when_text(fraction: float, steps: int) -> str:
    """The `when` that switches at `fraction` of `steps`: a decimal below 1, or the step count for 1 (`from`
    throughout; A1111 reads 1.0 differently across versions, so whole runs are written as a step number)."""
    if fraction >= 1:
        return str(steps)
    return f"{fraction:.6f}".rstrip("0").rstrip(".") or "0"


def parse_points(text: str) -> tuple[float, ...]:
    """'0,0.1,0.5,1' -> switch points, fractions in [0, 1]; ValueError naming what is allowed."""
    try:
        points = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"switch points are comma-separated fractions of the steps from 0 to 1, such as "
                         f"0,0.1,0.25,0.5,0.85,1; got {text[:60]!r}") from None
    return check_points(points)


def check_points(points: Sequence[float]) -> tuple[float, ...]:
    points = tuple(float(p) for p in points)
    if not points or len(points) > MAX_POINTS:
        raise ValueError(f"give 1 to {MAX_POINTS} switch points (fractions of the steps from 0 to 1), "
                         f"got {len(points)}")
    if any(not 0 <= p <= 1 for p in points):
        raise ValueError(f"switch points are fractions of the steps from 0 to 1, "
                         f"got {', '.join(f'{p:g}' for p in points)}")
    if len(set(points)) != len(points):
        raise ValueError(f"a switch point repeats: {', '.join(f'{p:g}' for p in points)}")
    return points


@dataclass(frozen=True)
class LayoutCell:
    """One run: one seed, the switch at one point."""

    fraction: float  # where the switch comes, as a fraction of the steps (0: `to` from the start; 1: never)
    switch_step: int | None  # first step (1-based) that reads `to`; None: no step does
    seed: int
    prompt: str  # the run's prompt: the schedule with this switch point written in as its when
    result: GenerationResult
    verdict: Verdict  # what the judge reads in the image
    reads: str  # one of READS

    @property
    def image(self) -> Image.Image:
        return self.result.image


@dataclass(frozen=True)
class LayoutReport:
    """The switch at several points, for one or more seeds; grows one run at a time (seed by seed)."""

    request: GenerationRequest  # the request as given, seed fixed (the first of the seeds)
    before: str  # the prompt as read before the switch (`from`)
    after: str  # the prompt as read after it (`to`)
    changes: dict[str, tuple[str, str]]  # what the switch changes that the judge reads: attribute -> (from, to)
    fractions: tuple[float, ...]  # every switch point planned, in order
    switch_steps: tuple[int | None, ...]  # per switch point, the first step (1-based) that reads `to`; None: none does
    seeds: tuple[int, ...]  # every seed planned
    cells: tuple[LayoutCell, ...]  # done so far: seed by seed, each over every switch point
    done: bool

    @property
    def steps(self) -> int:
        return self.request.num_inference_steps

    def counts(self) -> list[dict[str, int]]:
        """Per switch point (in order), how many of the seeds done read `from`, `to` and neither."""
        out = [dict.fromkeys(READS, 0) for _ in self.fractions]
        for c in self.cells:
            out[self.fractions.index(c.fraction)][c.reads] += 1
        return out

    def majority(self) -> list[str | None]:
        """Per switch point, what most of the seeds done show (one of READS), None where no reading has a majority."""
        out = []
        for c in self.counts():
            total = sum(c.values())
            out.append(next((r for r in READS if total and c[r] * 2 > total), None))
        return out

    def settled(self) -> tuple[int | None, int | None]:
        """(index of the latest switch point whose images still mostly show `to`, index of the earliest later one whose
        images mostly keep `from`); None where there is none."""
        order = sorted(range(len(self.fractions)), key=lambda k: self.fractions[k])
        majority = self.majority()
        last_to = next((k for k in reversed(order) if majority[k] == "to"), None)
        later = order if last_to is None else order[order.index(last_to) + 1:]
        first_from = next((k for k in later if majority[k] == "from"), None)
        return last_to, first_from

    def words(self) -> str:
        """What the grid shows, in a few sentences, from the judge's readings."""
        if not self.cells:
            return ""
        what = " and ".join(self.changes)
        olds = " / ".join(b for b, _ in self.changes.values())
        news = " / ".join(a for _, a in self.changes.values())
        last_to, first_from = self.settled()
        n = self.steps
        if last_to is None and first_from is None:
            return (f"Most images show neither {olds} nor {news} at every switch point: the judge cannot tell when the "
                    f"{what} is decided on this prompt.")
        if last_to is None:
            return f"Even the earliest switch keeps {olds}: the {what} was decided before it; try an earlier one."
        a = self.switch_steps[last_to] or n + 1
        if first_from is None:
            return (f"The image follows the new text ({news}) at every switch point up to "
                    f"{self.fractions[last_to]:.0%}: "
                    f"the {what} stays open until step {min(a, n)} of {n}.")
        b = self.switch_steps[first_from] or n + 1
        middle = (a + b - 1) / 2 / n
        when = ("in the first steps: it belongs to the layout" if middle <= 1 / 3 else
                "only in the last steps: on this model it is a detail, drawn after the layout" if middle >= 2 / 3 else
                "in the middle of the run")
        steps = f"step {a}" if b - 1 <= a else f"steps {a} to {b - 1}"
        return (f"A switch at {self.fractions[last_to]:.0%} (the new text from step {a}) still draws {news}; at "
                f"{self.fractions[first_from]:.0%} (" + (f"from step {b}" if b <= n else "never") + f") the image "
                f"keeps {olds}. So the {what} is decided during {steps} of {n}, {when}. A later switch changes only "
                f"what is still open.")

    def to_dict(self) -> dict[str, Any]:
        """The numbers, JSON-ready (as the UI and the API show them): the switch points, the judge's readings."""
        return {"experiment": "layout", "seed": self.request.seed, "request": self.request.to_dict(),
                "done": self.done, "before": self.before, "after": self.after,
                "changes": {k: {"from": b, "to": a} for k, (b, a) in self.changes.items()},
                "fractions": list(self.fractions), "switch_steps": list(self.switch_steps), "seeds": list(self.seeds),
                "counts": self.counts(),
                "words": self.words(),
                "cells": [{"fraction": c.fraction, "switch_step": c.switch_step, "seed": c.seed, "prompt": c.prompt,
                           "reads": c.reads, "judge": dataclasses.asdict(c.verdict)} for c in self.cells]}

    def write(self, out: str | Path) -> dict[str, Any]:
        """OUT/layout.json (to_dict() and the image paths, relative to OUT), OUT/layout.png (the grid, and the share
        of seeds that keep `from` against the switch point for several seeds) and OUT/cells/s<seed>_f<f>.png (each
        with its request metadata: the prompt as typed, the switch written in)."""
        out = Path(out)
        data = self.to_dict()
        for row, c in zip(data["cells"], self.cells):
            row["image"] = f"cells/s{c.seed}_f{c.fraction:g}.png"
            save_image(out / row["image"], c.result)
        _save(out, "layout.png", layout_figure(self))
        write_json(out / "layout.json", data)
        return data


def _reads(verdict: Verdict, changes: dict[str, tuple[str, str]]) -> str:
    if not verdict.found:
        return "neither"
    seen = [getattr(verdict, k) for k in changes]
    if seen == [b for b, _ in changes.values()]:
        return "from"
    if seen == [a for _, a in changes.values()]:
        return "to"
    return "neither"


def judge_changes(before: str, after: str) -> dict[str, tuple[str, str]]:
    """What the judge can tell apart between the two texts: attribute -> (value in `before`, value in `after`);
    ValueError when it cannot score them or they ask for the same."""
    wanted_before, wanted_after = prompt_targets(before), prompt_targets(after)
    changes = {k: (wanted_before[k], wanted_after[k]) for k in wanted_before
               if k in wanted_after and wanted_before[k] != wanted_after[k]}
    if not changes:
        raise ValueError(f"the switch must change what the judge reads (colour, shape, size, position or background), "
                         f"such as [circle:triangle:0.5]; {before!r} and {after!r} ask for the same")
    return changes


def layout(request: GenerationRequest, fractions: Sequence[float] = SWITCH_POINTS, seeds: int = 1, *,
           loader: ModelLoader, cancelled: Cancelled | None = None,
           run_seconds: float | None = None) -> Iterator[LayoutReport]:
    """Run the request's one [from:to:when] with the switch at each of `fractions` (its own when is replaced), for
    `seeds` seeds (s, s+1, ...), and read each image with the judge."""
    check_judge_model(request.model)
    fractions = check_points(fractions)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a whole number of at least 1, got {seeds!r}")
    if len(fractions) * seeds > MAX_RUNS:
        raise ValueError(f"{len(fractions)} switch points x {seeds} seeds is {len(fractions) * seeds} runs; "
                         f"at most {MAX_RUNS}")
    request = seeded(request)
    n = request.num_inference_steps
    before = dataclasses.replace(request, prompt=switch_at(request.prompt, str(n))).schedule.pairs[0][0]
    after = dataclasses.replace(request, prompt=switch_at(request.prompt, "0")).schedule.pairs[0][0]
    changes = judge_changes(before, after)
    plan = []
    for f in fractions:
        cell = dataclasses.replace(request, prompt=switch_at(request.prompt, when_text(f, n)))
        to_from = next((s.first for s in cell.schedule.prompt if s.text == after), None)
        plan.append((f, None if to_from is None or to_from >= n else to_from + 1, cell))
    seed_list = tuple((request.seed + i) % 2**63 for i in range(seeds))
    judge = Judge()
    report = LayoutReport(request, before, after, changes, fractions, tuple(p[1] for p in plan), seed_list, (),
                          done=False)
    cells: list[LayoutCell] = []
    for s in seed_list:
        for f, switch_step, cell in plan:
            watch = _Watch(cancelled, keep=False, run_seconds=run_seconds)
            result = generate(dataclasses.replace(cell, seed=s), watch, loader=loader)
            if watch.stopped(result):
                return
            verdict = judge(result.image)
            cells.append(LayoutCell(f, switch_step, s, cell.prompt, result, verdict, _reads(verdict, changes)))
            report = dataclasses.replace(report, cells=tuple(cells), done=len(cells) == len(plan) * seeds)
            yield report


def _captioned(image: Image.Image, caption: str, colour: str) -> Image.Image:
    """The image enlarged to CELL_SIDE (nearest neighbour) over a one-line caption."""
    zoom = max(1, -(-CELL_SIDE // max(image.size)))
    big = image.convert("RGB").resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    canvas = Image.new("RGB", (big.width, big.height + 14), "white")
    canvas.paste(big, (0, 0))
    ImageDraw.Draw(canvas).text((2, big.height + 2), caption, fill=colour)
    return canvas


def cell_caption(cell: LayoutCell, changes: dict[str, tuple[str, str]]) -> str:
    """The judge's reading of the attributes that change, and whose value it is: 'triangle (to)'."""
    seen = "nothing" if not cell.verdict.found else " ".join(str(getattr(cell.verdict, k)) for k in changes)
    return f"{seen} ({cell.reads})" if cell.reads != "neither" else seen


def column_label(fraction: float, switch_step: int | None) -> str:
    return f"{fraction:.0%}: " + ("never" if switch_step is None else f"from step {switch_step}")


def layout_figure(report: LayoutReport) -> Image.Image:
    """A row per seed, a column per switch point (each image over the judge's reading) and, for several seeds and
    points, the share of seeds that keep `from`'s value against the switch point."""
    colours = {"from": "#1f4e9c", "to": "#b3261e", "neither": "#555"}
    rows = [[None] * len(report.fractions) for _ in report.seeds]
    for c in report.cells:
        rows[report.seeds.index(c.seed)][report.fractions.index(c.fraction)] = _captioned(
            c.image, cell_caption(c, report.changes), colours[c.reads])
    changes = ", ".join(f"{k} {b} -> {a}" for k, (b, a) in report.changes.items())
    pictures = grid_image(rows, col_labels=[column_label(f, k) for f, k in zip(report.fractions, report.switch_steps)],
                          row_labels=[f"seed {s}" for s in report.seeds], min_side=CELL_SIDE,
                          title=f"{report.request.prompt!r}, {counted(report.steps, 'step')}: the judge reads {changes}",
                          x_title="the switch to the new text comes at (share of the steps: first step that reads it)")
    counts = report.counts()
    if len(report.seeds) < 2 or len(report.fractions) < 2 or not report.done:
        return pictures
    keep = [c["from"] / max(1, sum(c.values())) for c in counts]
    chart = line_chart(list(report.fractions), {"share of seeds that keep the old text": keep},
                       title="later switches change less", x_label="switch point (share of the steps)",
                       size=(max(420, pictures.width // 2), 200))
    return stack(pictures, chart)
