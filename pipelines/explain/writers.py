"""Files of the experiments: images and one JSON per experiment (the CLI writes these; paths in the JSON are
relative to `out`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipelines.explain.figures import grid_image, line_chart, stack
from pipelines.explain.jump import JumpReport, frame_steps
from pipelines.explain.branch import BranchReport
from pipelines.explain.sweep import SweepReport
from pipelines.explain.dissect import DissectReport
from pipelines.explain.tradeoff import TradeoffReport


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
