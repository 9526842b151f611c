"""Pictures of the experiments' results: labelled image grids and line charts drawn with PIL."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


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
