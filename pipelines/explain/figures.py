"""Pictures of the experiments' results: labelled image grids and line charts drawn with PIL, and the one picture
of each experiment that its report's write() saves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # annotations only: the experiment modules import this one to draw their pictures (a cycle)
    from pipelines.explain.branch import BranchReport
    from pipelines.explain.dissect import DissectReport
    from pipelines.explain.jump import JumpReport
    from pipelines.explain.sweep import SweepReport
    from pipelines.explain.tradeoff import TradeoffReport


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
               x_label: str = "", size: tuple[int, int] = (420, 200), top: float | None = None) -> Image.Image:
    """A small line chart, each series scaled to its own maximum (the legend gives each one's range), or all to
    `top` where given (series meant to be compared with one another, such as shares of one whole)."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    width, height = size
    left, right, top_px, bottom = 10, 10, 18 + 14 * len(series), 28
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
        top_v = top if top is not None else hi if hi > 0 else 1.0
        py = lambda v: height - bottom - max(0.0, v) / top_v * (height - top_px - bottom)  # noqa: E731
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


# -- one picture per experiment -------------------------------------------------------------------------------------


def jump_figure(report: JumpReport, picks: Sequence[int]) -> Image.Image:
    """x̂0 at the loop indices `picks` above the k-step runs of as many steps, the final image, and a chart of the
    distance to the final image and the sharpness per step."""
    n = len(report.steps)
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
    return stack(pictures, chart, bands_chart(report, size=(max(420, pictures.width // 2), 220)))


def bands_chart(report: JumpReport, size: tuple[int, int] = (420, 220)) -> Image.Image:
    """Coarse before fine: per step, each frequency band's share of how much x̂0 changed (0 to 1, one scale)."""
    changed = [s for s in report.steps if s.bands is not None]
    shares = [s.band_shares() for s in changed]
    names = ["low (layout)", "mid", "high (details)"]
    return line_chart([s.step + 1 for s in changed] or [1],
                      {name: [sh[j] for sh in shares] for j, name in enumerate(names)},  # type: ignore[index]
                      title="coarse before fine: share of x0's change per step by spatial frequency (the layout "
                            "first, then the details)", x_label="step", size=size, top=1.0)


def branch_figure(report: BranchReport) -> Image.Image:
    """A row per branch point (the trunk, then a column per noise seed) and, for several points, diversity against f."""
    n = report.request.num_inference_steps
    rows = [[report.trunk, *p.images, p.mean, p.x0] for p in report.points]
    kind = "stochastic" if report.stochastic else "deterministic: no noise after the start, so every branch is the same"
    noises = [f"noise {j + 1}" for j in range(len(report.points[0].images))]
    pictures = grid_image(rows, col_labels=["no branch"] + noises + ["mean of endings", "x0 at f"],
                          row_labels=[f"f={p.fraction:g} (step {p.step} of {n}) div={p.diversity:.3f}"
                                      + ("" if p.x0_to_mean is None else f" x0-mean={p.x0_to_mean:.3f}")
                                      for p in report.points],
                          title=f"{report.request.prompt!r}, seed {report.request.seed}, {report.scheduler} ({kind})",
                          x_title="branches: same x_t at f, different noise draws afterwards; x0 estimates the mean "
                                  "of the endings (a blend), each walk picks one", y_title="branch point f")
    if len(report.points) < 2:
        return pictures
    return stack(pictures, line_chart([p.fraction for p in report.points],
                                      {"diversity": [p.diversity for p in report.points],
                                       "x0 to the mean of the endings": [p.x0_to_mean for p in report.points]},
                                      title="diversity of the endings, and x0's RMS distance to their mean, against "
                                            "the branch point", x_label="f"))


def sweep_figure(report: SweepReport) -> Image.Image:
    """The grid with labelled axes (a cell not run yet is blank)."""
    x, y = report.x, report.y
    rows: list[list[Image.Image | None]] = [[None] * len(x.values) for _ in (y.values if y else [None])]
    for c in report.cells:
        rows[c.row][c.col] = c.image
    return grid_image(rows, col_labels=[x.label(v) for v in x.values],
                      row_labels=[y.label(v) for v in y.values] if y else [],
                      title=f"{report.request.prompt!r}" + ("" if "seed" in (x.name, y.name if y else "") else
                                                           f", seed {report.request.seed} in every cell"),
                      x_title=f"x: {x.name}", y_title=f"y: {y.name}" if y else "")


def dissect_figure(report: DissectReport, picks: Sequence[int]) -> Image.Image:
    """Conditional, unconditional and guided x̂0 at the loop indices `picks` (the guided row only where no step
    ran the unconditional pass), over a chart of ‖ε_c − ε_u‖, the effective scale and how much x̂0 moves per step."""
    n = len(report.steps)
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
    chart = line_chart([s.step + 1 for s in report.steps],
                       {"|eps_c - eps_u|": [s.guidance_delta_norm for s in report.steps],
                        "effective scale": [s.effective_scale for s in report.steps],
                        "|x0_k - x0_k-1|": [s.x0_change for s in report.steps]},
                       title="per step", x_label="step", size=(max(420, pictures.width // 2), 220))
    return stack(pictures, chart)


def tradeoff_figure(report: TradeoffReport) -> Image.Image:
    """A row per guidance scale (a column per seed) and, for several scales, adherence and diversity against it."""
    wanted = ", ".join(f"{k} {v}" for k, v in report.targets.items())
    pictures = grid_image([list(p.images) for p in report.points],
                          col_labels=[f"seed {s}" for s in report.points[0].seeds],
                          row_labels=[f"CFG {p.guidance_scale:g}: adh {p.adherence:.2f} div {p.diversity:.3f}"
                                      for p in report.points], min_side=96,
                          title=f"{report.request.prompt!r}: the judge checks {wanted}", y_title="guidance scale")
    if len(report.points) < 2:
        return pictures
    return stack(pictures, line_chart([p.guidance_scale for p in report.points],
                                      {"adherence": [p.adherence for p in report.points],
                                       "diversity": [p.diversity for p in report.points]},
                                      title="adherence (judge) and diversity against the guidance scale",
                                      x_label="guidance scale"))
