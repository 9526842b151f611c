"""The Explain lab view: six experiments from pipelines/explain/ on the main tab's prompt, model, scheduler,
guidance and seed, one sub-tab each, each with a few sentences saying what to look at and why.

Every experiment is a generator of growing reports (pipelines/explain/). The handlers advance it one step at a
time as jobs on the app's one generation worker (so it never runs beside a main-tab run, with the torch thread
count the model wants) and yield each partial result to the browser; Stop ends it between runs and, through the
experiment's `cancelled` check, inside a run at the next step boundary. Each experiment is also a named API
endpoint (/explain_jump, /explain_branch, /explain_sweep, /explain_dissect, /explain_tradeoff, /explain_attention,
/explain_layout).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import secrets
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import gradio as gr
import numpy as np
import pandas as pd

from pipelines import explain
from pipelines.explain.layout import cell_caption as layout_caption, column_label as layout_column
from pipelines.outputs import save_png
from pipelines.prompts import switch_at
from pipelines.worker import load_here
from pipelines.words import counted
from ui.controls import model_family
from ui.live import KEEPALIVE_SECONDS, admission_validator, as_gr_error
from ui.render import upscale
from ui.sliders import StrictSlider
from ui.state import Playground
from ui.theme import progress_bar, progress_html

JUMP_COLOURS = {"x̂0 at step k (jump now)": "#1f77b4", "x̂0 at step k": "#1f77b4", "a k-step run": "#ff7f0e"}
# The series of each Explain plot (see _frame).
JUMP_DISTANCE = ("x̂0 at step k (jump now)", "a k-step run")
JUMP_SHARPNESS = ("x̂0 at step k", "a k-step run")
JUMP_BANDS = ("low (layout)", "mid", "high (details)")  # JumpStep.bands, coarse to fine
BRANCH_SERIES = ("diversity of the endings", "x̂0 to the mean of the endings")
DISSECT_PUSH = ("‖ε_c − ε_u‖", "effective scale")
DISSECT_MOVE = ("guided x̂0",)
TRADEOFF_SERIES = ("adherence (judge)", "diversity")
LAYOUT_PROMPT = "a large red [circle:triangle:WHEN] in the center"  # the layout tab's default switch
SHOW_SIDE = 192  # gallery images are enlarged (nearest neighbour) to at least this many pixels on the server

# Gallery captions below the thumbnails (as the history does), never over a small object in a corner.
STYLE = """<style>
.explain-gallery .caption-label { position: static !important; background: none !important; color: inherit !important;
  white-space: normal !important; font-size: 0.75em; padding: 2px 0 0 0 !important; max-width: 100% !important; }
.explain-gallery .thumbnail-item { flex-direction: column; height: auto !important; }
.explain-gallery img { image-rendering: pixelated; }
#explain-layout-gallery .gallery-container, #explain-layout-gallery .grid-wrap {
  height: auto !important; min-height: 0 !important; max-height: none !important; overflow: visible !important; }
@media (max-width: 640px) {  /* a phone: the switch points wrap (each caption names its own) rather than scroll away */
  #explain-layout-gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)) !important; } }
</style>"""

TEXT = {
    "bands": "**Coarse before fine.** How much x̂0 changes from one step to the next, split into low spatial "
             "frequencies (the layout: where the big shapes and colours sit), middle ones and high ones (edges and "
             "texture). The first steps change x̂0 mostly in the low band, the last ones more in the high band: "
             "the layout first, then the details.",
    "jump": "**Jump vs walk.** At every step the model predicts the clean image x̂0; *jump now* decodes that "
            "prediction, *keep walking* is where the full run ends, and *take k big steps* is a separate run of only "
            "k steps. Watch the distance to the final image fall and the sharpness rise step by step: the first "
            "prediction is the blurry average of everything the prompt allows, and each step commits to more of one "
            "image. A k-step run is not step k of a long run: "
            "with so few steps the sampler's small-step assumption breaks and it can land on a different image.",
    "branch": "**Branching.** The trunk runs to a fraction f of the schedule, then finishes several times from the "
              "same x_t with different noise draws. Early branches still end far apart; late ones have already "
              "committed, so diversity (mean pairwise distance of the endings) falls as f grows. A deterministic "
              "sampler (DDIM, DPM++ 2M) adds no noise after the start, so all its branches are the same image: "
              "only the starting noise is random there. Where can it still go? Each row ends with the pixel mean of "
              "the endings beside x̂0 at the branch step: x̂0 estimates that mean, a blend of the possible endings, "
              "and a walk picks one of them; the plot shows x̂0's distance to the mean falling as f grows.",
    "sweep": "**Sweep grid.** The same seed in every cell (unless the seed is an axis), so each difference comes "
             "from the setting on the axis alone. Try steps against guidance scale: few steps with high guidance "
             "overshoot into noisy colour, many steps settle. Click a cell to load its settings into the main "
             "controls above.",
    "dissect": "**Guidance dissection.** Classifier-free guidance runs the model with and without the prompt and "
               "pushes the result away from the unconditional guess by the scale. Compare the conditional, "
               "unconditional and guided x̂0 at a step, and see on the plots how large that push is "
               "(‖ε_c − ε_u‖), which scale was applied and how much x̂0 still moves; a guidance interval shows as "
               "steps at scale 1.",
    "tradeoff": "**Diversity vs adherence.** For each guidance scale the same seeds are run and the shapes-world "
                "judge checks each image against the prompt (colour, shape, size, position). Higher guidance "
                "usually follows the prompt more closely and makes the images more alike; the plot shows how far "
                "that holds on your prompt. Embedded model only: the judge knows only its world.",
    "attention": "**Which word drew where.** At every step the model's cross-attention layers let each part of the "
                 "image look at the prompt's words. Summed over the layers and heads (as DAAM does), that shows where "
                 "each word acted: pick a word, and move k to see where it acted at step k, over that step's x̂0; "
                 "the right image is the whole run over the final image. Early steps spread a word over the blurry "
                 "layout, later ones hold it on the part of the picture it names. Small words (a, the) can gather "
                 "attention too: the model may use any token as a handle. SD, SDXL, PixArt-Σ, and SD3 (the image "
                 "attending to the text in its joint attention).",
    "layout": "**When is the layout decided?** A prompt schedule `[from:to:when]` (AUTOMATIC1111's prompt "
              "editing) reads `from` until the switch and `to` after it. Run with the switch at several points and the "
              "same seed, each image shows what was still open when the switch came: what the new text changes was "
              "not decided yet, what it cannot change was. On the embedded model (20 steps, 6 seeds) position and "
              "size are decided in the first quarter of the steps, the colour around the middle, and the outline "
              "(circle or triangle) only in the last two: coarse before fine. Try `[in the top left:in the bottom "
              "right:WHEN]` or `[red:blue:WHEN]`. The shapes world's judge reads each image (embedded model only).",
}


def _frame(rows: list[dict], x: str, series: tuple[str, ...]) -> pd.DataFrame:
    """A LinePlot's data with every one of its `series` in it, a missing one as an empty row: Gradio's LinePlot keeps
    the colour series of the first data it draws, so a series that first comes in a later update (the k-step runs,
    a plot's next run) would never be drawn, and a run whose only series is new would draw an empty plot."""
    present = {r["series"] for r in rows}
    if not present <= set(series):
        raise ValueError(f"series {sorted(present - set(series))} are not among the plot's {list(series)}")
    rows = rows + [{x: None, "value": None, "series": name} for name in series if name not in present]
    return pd.DataFrame(rows, columns=[x, "value", "series"])


EXPERIMENT_RUNS = 4  # an experiment may take this many times PLAYGROUND_MAX_RUN_SECONDS
KEEPALIVE = object()  # _stream's "nothing new yet" while a job runs
EXPLAIN_CONCURRENCY = 16  # experiments let in at once (they then wait on the worker); above the per-client limit
JUMP_GALLERY_FRAMES = 30  # the jump gallery shows every step up to this many, else this many spread evenly
# Decoded x̂0 images one jump or dissection report keeps, in the session's state (Gradio frees it an hour after
# the tab closes); past it evenly spaced steps keep theirs. The embedded model never reaches it (1000 steps of
# 64² images: 12 MB); 200 steps of SD's 512² would hold 157 MB, a dissection three times that.
EXPERIMENT_IMAGE_BYTES = 64 * 2**20


def _thinned(shown: int, kept: int, total: int) -> str:
    """The note under images shown from a nearby step because the experiment kept only some steps' images."""
    return (f" The images are from step {shown + 1}, the nearest of the {kept} of {counted(total, 'step')} whose "
            f"images this run keeps, to bound memory; the numbers are step-exact.")


def _whole(value: Any, name: str) -> int:
    """A whole-number field's value; a fraction (2.5 branches) is refused, never truncated."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise gr.Error(f"{name} must be a whole number, got {str(value)[:60]!r}", print_exception=False)
    return int(number)


def _interim(report: Any, status: gr.Markdown, request,
             bar: tuple[gr.HTML, Callable[[Any], str]] | None = None) -> dict | None:
    """The status update for what ExplainView._stream yields between results, else None: nothing new yet (a
    keep-alive, after which Gradio checks that the client is still there) or x̂0 still being decoded, in slices
    that let other runs in between (then also the progress `bar`, as (component, its html from the report))."""
    if report is KEEPALIVE:
        return {status: gr.skip()}
    if getattr(report, "decoding", False):
        out = {status: f"Decoding x̂0: step {len(report.steps)} of {request.num_inference_steps} (seed {request.seed})…"}
        return out | ({bar[0]: bar[1](report)} if bar is not None else {})
    return None


# The progress bar of each experiment: the fraction of its runs (or cells) done, a run whose x̂0 are being decoded
# counted by the fraction decoded; a report comes once a run (a branch point, a cell, a scale) is whole.

def _state(done: bool) -> str:
    return "done" if done else "running"


def jump_progress(report: explain.JumpReport) -> str:
    """The full run, then the k-step runs."""
    total = 1 + len(report.short_steps)
    if report.decoding:
        k, n = len(report.steps), report.request.num_inference_steps
        return progress_html(k / max(n, k, 1), total, f"run 1 of {total}: x̂0 decoded {k} / {n}")
    done = 1 + len(report.short_runs)
    return progress_html(done, total, f"{done} / {counted(total, 'run')}", _state(report.done))


def branch_progress(report: explain.BranchReport | None, total: int, per_point: int) -> str:
    """The trunk, then `per_point` branches at each point."""
    done = 0 if report is None else 1 + len(report.points) * per_point
    return progress_html(done, total, f"{done} / {counted(total, 'run')}", _state(report is not None and report.done))


def sweep_progress(done: int, total: int, finished: bool = False) -> str:
    return progress_html(done, total, f"{done} / {counted(total, 'cell')}", _state(finished))


def dissect_progress(report: explain.DissectReport) -> str:
    """One run, then its x̂0 decoded step by step."""
    k, n = len(report.steps), max(report.request.num_inference_steps, len(report.steps))
    if report.decoding:
        return progress_html(k, n, f"x̂0 decoded {k} / {n}")
    return progress_html(k, k, f"{k} / {counted(k, 'step')} decoded", "done")


def tradeoff_progress(report: explain.TradeoffReport | None, total: int, seeds: int) -> str:
    """`seeds` runs per guidance scale."""
    done = 0 if report is None else len(report.points) * seeds
    return progress_html(done, total, f"{done} / {counted(total, 'run')}", _state(report is not None and report.done))


def attention_progress(report: explain.AttentionReport) -> str:
    """One run with the attention probes, then its x̂0 decoded step by step."""
    k, n = len(report.steps), max(report.request.num_inference_steps, len(report.steps))
    if report.decoding:
        return progress_html(k, n, f"x̂0 decoded {k} / {n}")
    return progress_html(k, k, f"{k} / {counted(k, 'step')} decoded", "done")


class _Files:
    """PNGs of one experiment under outputs/explain/<id>/, written once each and served from there; the folder is
    made by Playground.experiment_folder (fair retention per client)."""

    def __init__(self, app: Playground, http: gr.Request | None) -> None:
        self.folder = app.experiment_folder(app.client_of(http))
        self.paths: dict[str, str] = {}

    def __call__(self, name: str, image) -> str:
        if name not in self.paths:
            array = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else image
            self.paths[name] = str(save_png(self.folder / f"{name}.png", upscale(array, SHOW_SIDE)))
        return self.paths[name]


def run_controls(name: str, run_label: str) -> tuple[gr.Button, gr.Button, gr.Markdown, gr.HTML]:
    """An experiment tab's Run and Stop buttons (one row), its status line and progress bar, with the elem_ids the
    page's CSS and the tests know (explain-<name>-status, explain-<name>-progress)."""
    with gr.Row():
        run = gr.Button(run_label, variant="primary", scale=3)
        stop = gr.Button("Stop", variant="stop", scale=1)
    return run, stop, gr.Markdown("", elem_id=f"explain-{name}-status"), progress_bar(f"explain-{name}-progress")


class ExplainView:
    """The Explain lab: one sub-tab per experiment, each reading the main controls."""

    def __init__(self, app: Playground, controls, image_bytes: int = EXPERIMENT_IMAGE_BYTES,
                 gpu: Callable[[Callable], Callable] = lambda fn: fn) -> None:
        self.app = app
        self.controls = controls
        self.image_bytes = image_bytes  # per jump / dissection report (EXPERIMENT_IMAGE_BYTES)
        self.gpu = gpu  # wraps the handlers that run the model (spaces.GPU on ZeroGPU), as app.py does Generate's
        self._cancel: dict[str, threading.Event] = {}  # session -> the running experiment's stop flag
        self._lock = threading.Lock()
        gr.HTML(STYLE, padding=False)
        gr.Markdown("The lab runs its experiments on the prompt, model, scheduler, steps, guidance and seed set "
                    "above (tick off *Random seed* to repeat one). Each experiment makes many images: watch them "
                    "arrive, or press Stop.", elem_classes="step-note")
        with gr.Tabs(elem_id="explain-tabs"):
            with gr.Tab("Jump vs walk", elem_id="explain-jump-tab"):
                gr.Markdown(TEXT["jump"], elem_classes="step-note")
                self.jump_btn, self.jump_stop, self.jump_status, self.jump_progress = (
                    run_controls("jump", "Run jump vs walk"))
                self.jump_state = gr.State(None)
                with gr.Row():
                    self.jump_distance = gr.LinePlot(x="step", y="value", color="series", title="distance to final", color_map=JUMP_COLOURS, elem_id="explain-jump-distance",
                                                     x_title="step", y_title="RMS distance", height=240)
                    self.jump_sharpness = gr.LinePlot(x="step", y="value", color="series", title="x̂0 sharpness", color_map=JUMP_COLOURS,
                                                      x_title="step", y_title="Laplacian energy", height=240)
                self.jump_bands = gr.LinePlot(x="step", y="value", color="series", elem_id="explain-jump-bands",
                                              title="coarse before fine: share of x̂0's change by frequency",
                                              x_title="step", y_title="share of the change", height=240)
                gr.Markdown(TEXT["bands"], elem_classes="step-note")
                self.jump_k = StrictSlider(1, 20, value=5, step=1, label="Compare at step k", elem_id="explain-jump-k")
                with gr.Row():
                    with gr.Column():
                        self.jump_compare = gr.ImageSlider(label="jump now | keep walking", show_label=False,
                                                           type="filepath", height=260, elem_classes="pixelated",
                                                           elem_id="explain-jump-slider")
                        gr.Markdown("left: **jump now** (x̂0 at step k) · right: **keep walking** (the final image); "
                                    "drag the handle", elem_classes="caption")
                    with gr.Column():
                        self.jump_short = gr.Image(label="take k big steps", show_label=False, type="filepath",
                                                   height=260, interactive=False, elem_classes="pixelated")
                        gr.Markdown("**take k big steps**: a separate run of only k steps", elem_classes="caption")
                self.jump_note = gr.Markdown("", elem_classes="step-note")
                gr.Markdown(f"x̂0 at every step of the full run (at {JUMP_GALLERY_FRAMES} evenly spaced steps in "
                            f"longer runs; the slider above reaches every step), with its RMS distance d to the "
                            f"final image:", elem_classes="step-note")
                self.jump_gallery = gr.Gallery(label="x̂0 along the run", show_label=False, columns=10, height="auto",
                                               elem_classes="explain-gallery", allow_preview=False)
            with gr.Tab("Branching", elem_id="explain-branch-tab"):
                gr.Markdown(TEXT["branch"], elem_classes="step-note")
                with gr.Row():
                    self.branch_at = gr.Textbox("0.1,0.3,0.5,0.7,0.9", label="Branch points f (fractions of the schedule)")
                    self.branch_n = StrictSlider(2, 8, value=4, step=1, label="Branches per point")
                    self.branch_scheduler = gr.Radio([("euler_a (stochastic)", "euler_a"), ("ddim (deterministic)", "ddim"),
                                                      ("the main scheduler", "main")], value="euler_a", label="Sampler")
                self.branch_btn, self.branch_stop, self.branch_status, self.branch_progress = (
                    run_controls("branch", "Run branching"))
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown("The endings: a row per branch point, the unbranched run first, then the mean of "
                                    "the endings and x̂0 at the branch step.", elem_classes="step-note")
                        self.branch_gallery = gr.Gallery(label="endings: a row per branch point", show_label=False, columns=5, height="auto",
                                                         elem_classes="explain-gallery", allow_preview=False)
                    with gr.Column(scale=2):
                        self.branch_plot = gr.LinePlot(x="f", y="value", color="series", title="diversity", color_map={BRANCH_SERIES[0]: "#1f77b4", BRANCH_SERIES[1]: "#d62728"}, elem_id="explain-branch-plot",
                                                       x_title="branch point f", y_title="RMS distance",
                                                       height=260)
            with gr.Tab("Sweep grid", elem_id="explain-sweep-tab"):
                gr.Markdown(TEXT["sweep"], elem_classes="step-note")
                axes = list(explain.AXES)
                with gr.Row():
                    self.sweep_x = gr.Dropdown(axes, value="guidance_scale", label="x axis")
                    self.sweep_x_values = gr.Textbox("1,3,7.5,12", label="x values")
                    self.sweep_y = gr.Dropdown([("none", ""), *((a, a) for a in axes)], value="steps", label="y axis")
                    self.sweep_y_values = gr.Textbox("2,5,20", label="y values")
                self.sweep_btn, self.sweep_stop, self.sweep_status, self.sweep_progress = (
                    run_controls("sweep", "Run sweep"))
                self.sweep_state = gr.State([])
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown("The grid: x changes from left to right, y from top to bottom; click a cell to load its "
                                    "settings.", elem_classes="step-note")
                        self.sweep_gallery = gr.Gallery(label="grid (click a cell to load its settings)", show_label=False, columns=4,
                                                    height="auto", elem_classes="explain-gallery", allow_preview=False,
                                                    elem_id="explain-sweep-gallery")
                    with gr.Column(scale=1, min_width=160):
                        gr.Markdown("Every cell is a full run of `generate()` with the main settings except the two on the "
                                    "axes. The guidance method comparison is an x axis `guidance` with values such as "
                                    "`cfg,rescale,apg,pag`.", elem_classes="step-note")
            with gr.Tab("Guidance dissection", elem_id="explain-dissect-tab"):
                gr.Markdown(TEXT["dissect"], elem_classes="step-note")
                self.dissect_btn, self.dissect_stop, self.dissect_status, self.dissect_progress = (
                    run_controls("dissect", "Run dissection"))
                self.dissect_state = gr.State(None)
                with gr.Row():
                    self.dissect_push = gr.LinePlot(x="step", y="value", color="series", title="guidance per step",
                                                    x_title="step", y_title="value", height=240)
                    self.dissect_move = gr.LinePlot(x="step", y="value", color="series", title="how much x̂0 still moves",
                                                    x_title="step", y_title="‖x̂0_k − x̂0_k−1‖", height=240)
                self.dissect_k = StrictSlider(1, 20, value=5, step=1, label="Show step k", elem_id="explain-dissect-k")
                with gr.Row():
                    images = []
                    for caption in ("conditional x̂0 (with the prompt)", "unconditional x̂0 (without it)",
                                    "guided x̂0 (what the sampler uses)"):
                        with gr.Column(min_width=120):
                            images.append(gr.Image(label=caption, show_label=False, type="filepath", height=200,
                                                   interactive=False, elem_classes="pixelated"))
                            gr.Markdown(caption, elem_classes="caption")
                    self.dissect_cond, self.dissect_uncond, self.dissect_x0 = images
                self.dissect_note = gr.Markdown("", elem_classes="step-note")
            with gr.Tab("Diversity vs adherence", elem_id="explain-tradeoff-tab"):
                gr.Markdown(TEXT["tradeoff"], elem_classes="step-note")
                with gr.Row():
                    self.tradeoff_scales = gr.Textbox("1,2,3,5,7.5,12", label="Guidance scales")
                    self.tradeoff_seeds = StrictSlider(2, 12, value=6, step=1, label="Seeds per scale")
                self.tradeoff_btn, self.tradeoff_stop, self.tradeoff_status, self.tradeoff_progress = (
                    run_controls("tradeoff", "Run trade-off"))
                with gr.Row():
                    with gr.Column(scale=3):
                        gr.Markdown("The images: a row per guidance scale, the same seeds in every row.", elem_classes="step-note")
                        self.tradeoff_gallery = gr.Gallery(label="a row per guidance scale", show_label=False, columns=6, height="auto",
                                                           elem_classes="explain-gallery", allow_preview=False)
                    with gr.Column(scale=2):
                        self.tradeoff_plot = gr.LinePlot(x="guidance_scale", y="value", color="series",
                                                         title="adherence (judge) and diversity", x_title="guidance scale",
                                                         y_title="value", y_lim=[0, 1], height=260)
            self._attention_tab()
            self._layout_tab()
        with gr.Accordion("Numbers of the last experiment (JSON)", open=False):
            self.numbers = gr.JSON(label="numbers")

    # -- running on the worker -----------------------------------------------------------------------------------

    def _session_cancel(self, http: gr.Request | None) -> tuple[str, threading.Event]:
        """A fresh stop flag for the session's experiment or k-step run, replacing (and setting) its previous one."""
        session = getattr(http, "session_hash", None) or secrets.token_hex(4)
        cancel = threading.Event()
        with self._lock:
            old = self._cancel.get(session)
            if old is not None:
                old.set()  # a new experiment replaces the session's running one
            self._cancel[session] = cancel
        return session, cancel

    def _drop_cancel(self, session: str, cancel: threading.Event) -> None:
        cancel.set()
        with self._lock:
            if self._cancel.get(session) is cancel:
                del self._cancel[session]

    async def _stream(self, request, make: Callable[[explain.Cancelled], Iterator[Any]],
                      http: gr.Request | None) -> AsyncIterator[Any]:
        """Reports of `make(cancelled)`, each computed as one job on the generation worker and awaited (no thread
        held while it waits; it yields KEEPALIVE each second meanwhile, after which Gradio checks that the client is
        still there and closes the handler, and with it this generator, when it is gone). Stop, Gradio's cancel and a
        client that goes away stop the run in flight at its next step. Each run has the per-run time limit (the experiment
        passes `self.run_seconds` to its runs) and the experiment EXPERIMENT_RUNS times that in all."""
        app, box = self.app, {}
        limit = EXPERIMENT_RUNS * app.limits.max_run_seconds
        deadline = time.monotonic() + limit
        session, cancel = self._session_cancel(http)

        def stopped() -> bool:
            return cancel.is_set() or time.monotonic() > deadline

        def step():
            if "gen" not in box:
                box["gen"] = make(stopped)
            return next(box["gen"], None)

        try:
            while not stopped():
                job = asyncio.ensure_future(self._on_worker(request, step, cancel))
                while not (await asyncio.wait({job}, timeout=KEEPALIVE_SECONDS))[0]:
                    yield KEEPALIVE  # closing this generator (client gone) sets `cancel` below: the run stops
                report = job.result()
                if report is None:
                    break
                yield report
            if time.monotonic() > deadline and not cancel.is_set():  # what finished so far stays on screen
                raise gr.Error(f"The experiment stopped after {limit:g} s, the most one may take here "
                               f"({EXPERIMENT_RUNS} × the server's PLAYGROUND_MAX_RUN_SECONDS).", print_exception=False)
        except ValueError as e:
            raise as_gr_error(e, app.outputs_dir) from None
        finally:
            self._drop_cancel(session, cancel)
            if "gen" in box:
                app.worker.submit(box["gen"].close)

    async def _on_worker(self, request, fn: Callable[[], Any], cancel: threading.Event) -> Any:
        """fn() as a job on the generation worker with the model's torch thread count, awaited. A cancelled wait
        (Stop, the client gone) sets `cancel`, which the job's runs poll at every step."""
        def job():
            load_here(self.app.worker, request, loader=self.app.loader)
            return fn()

        try:
            return await asyncio.wrap_future(self.app.worker.submit(job))
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _counted(self, fn: Callable) -> Callable:
        """`fn` (an async generator or coroutine handler) counted against its client while it runs: it takes over the
        reservation the event's validator made when it was queued (ui/clients.py), refused with a gr.Error at the
        limit. The whole handler, so an event refused for bad input gives its slot back at once."""
        app = self.app

        def hold(http):
            try:
                return app.admission.hold(app.client_of(http))
            except ValueError as e:
                raise as_gr_error(e, app.outputs_dir) from None

        # Gradio calls the wrapper as `fn`'s signature says (functools.wraps), `http` first.
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def counted_stream(http: gr.Request, *args, **kwargs):
                # aclosing: when Gradio closes this (client gone, cancel), the handler and its experiment close now,
                # not when the garbage collector gets to them, and the run in flight stops at its next step.
                with hold(http):
                    async with contextlib.aclosing(fn(http, *args, **kwargs)) as handler:
                        async for out in handler:
                            yield out
            return counted_stream

        @functools.wraps(fn)
        async def counted(http: gr.Request, *args, **kwargs):
            with hold(http):
                return await fn(http, *args, **kwargs)
        return counted

    @property
    def run_seconds(self) -> float:
        """The wall-clock limit of each run an experiment makes (PLAYGROUND_MAX_RUN_SECONDS)."""
        return self.app.limits.max_run_seconds

    def stop(self, http: gr.Request) -> str:
        """Stop the session's experiment: between runs at once, inside a run at its next step boundary."""
        with self._lock:
            cancel = self._cancel.get(getattr(http, "session_hash", None) or "")
        if cancel is None:
            return "Nothing is running."
        cancel.set()
        return "Stopped; what finished so far stays below."

    def _request(self, values: dict[str, Any]):
        try:
            request, _ = self.controls.request(values)
        except ValueError as e:
            raise as_gr_error(e) from None
        return explain.seeded(request)  # the seed is fixed here, so the status can report it before the first result

    # -- jump ----------------------------------------------------------------------------------------------------

    async def run_jump(self, http: gr.Request, **values):
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        files = _Files(self.app, http)
        n = request.num_inference_steps
        yield {self.jump_status: f"Running {counted(n, 'step')} (seed {request.seed}), then the k-step runs…", self.jump_state: None,
               self.jump_gallery: [], self.jump_k: gr.Slider(1, n, value=max(1, n // 4)),
               self.jump_progress: progress_html(None, 1, f"run 1: {counted(n, 'step')}…")}
        make = lambda c: explain.jump(request, loader=self.app.loader, cancelled=c,  # noqa: E731
                                      max_image_bytes=self.image_bytes, run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.jump_status, request, (self.jump_progress, jump_progress))) is not None:
                    yield interim
                    continue
                dist = [{"step": s.step + 1, "value": s.distance_to_final, "series": JUMP_DISTANCE[0]}
                        for s in report.steps]
                dist += [{"step": r.steps, "value": r.distance_to_final, "series": JUMP_DISTANCE[1]} for r in report.short_runs]
                sharp = [{"step": s.step + 1, "value": s.sharpness, "series": JUMP_SHARPNESS[0]} for s in report.steps]
                sharp += [{"step": r.steps, "value": r.sharpness, "series": JUMP_SHARPNESS[1]} for r in report.short_runs]
                bands = [{"step": s.step + 1, "value": share, "series": name} for s in report.steps
                         if (shares := s.band_shares()) is not None for name, share in zip(JUMP_BANDS, shares)]
                out = {self.jump_distance: _frame(dist, "step", JUMP_DISTANCE),
                       self.jump_bands: _frame(bands, "step", JUMP_BANDS),
                       self.jump_sharpness: _frame(sharp, "step", JUMP_SHARPNESS),
                       self.jump_state: (report, files), self.numbers: report.to_dict(),
                       self.jump_progress: jump_progress(report)}
                if not report.short_runs:
                    kept = [s for s in report.steps if s.image is not None]
                    shown = [kept[i] for i in explain.frame_steps(len(kept), JUMP_GALLERY_FRAMES)]
                    out[self.jump_gallery] = [(files(f"x0_{s.step:03d}", s.image),
                                               f"step {s.step + 1}: d={s.distance_to_final:.3f}") for s in shown]
                done = "Done" if report.done else "Running"
                out[self.jump_status] = (f"{done}: seed {report.request.seed}, k-step runs "
                                         f"{len(report.short_runs)}/{len(report.short_steps)} "
                                         f"({', '.join(str(k) for k in report.short_steps)} step"
                                         f"{'' if list(report.short_steps) == [1] else 's'}).")
                k0 = report.short_steps[min(1, len(report.short_steps) - 1)] if report.short_steps else n
                if report.done or any(r.steps == k0 for r in report.short_runs):
                    out |= self._jump_at(report, k0, files)
                yield out

    def _jump_at(self, report: explain.JumpReport, k: int, files: _Files) -> dict:
        """The three images at step k (the k-step run's when the report has it). Images go to the experiment's own
        folder (`files`), not a new one per slider move."""
        k = max(1, min(int(k), len(report.steps)))
        jumped = report.steps[k - 1]
        short = next((r for r in report.short_runs if r.steps == k), None)
        if short is not None:
            short_image, short_d = short.image, short.distance_to_final
        else:
            short_image, short_d = None, None
        note = (f"Step {k} of {len(report.steps)}: x̂0 is {jumped.distance_to_final:.3f} from the final image (RMS, 0–1)"
                + ("" if short_d is None else f"; the {k}-step run ends {short_d:.3f} from it") + ".")
        if k == 1:
            note += " A 1-step run is exactly the jump from step 1: the same noise and one model call."
        shown = report.image_near(k - 1)
        if shown.step != jumped.step:
            note += _thinned(shown.step, sum(s.image is not None for s in report.steps), len(report.steps))
        return {self.jump_compare: (files(f"x0_{shown.step:03d}", shown.image), files("final", report.final)),
                self.jump_short: None if short_image is None else files(f"short_{k}", short_image),
                self.jump_note: note, self.jump_k: gr.Slider(1, len(report.steps), value=k)}

    async def on_jump_k(self, http: gr.Request, state, k):
        """The slider: step k's images, after the k-step run if the report lacks it. That run counts against the
        client (`_counted`), has the per-run time limit and stops at the next step on Stop or when the client goes away; it is
        kept in the state, so moving back to k runs nothing."""
        if state is None:
            return {self.jump_note: "Run the experiment first."}
        report, files = state
        try:
            k = _whole(k, "step k")
        except gr.Error as e:
            return {self.jump_note: str(e.message)}
        k = max(1, min(k, len(report.steps)))
        if not any(r.steps == k for r in report.short_runs):
            session, cancel = self._session_cancel(http)
            try:
                short = await self._on_worker(report.request, lambda: explain.short_run(
                    report, k, loader=self.app.loader, cancelled=cancel.is_set, run_seconds=self.run_seconds), cancel)
            except ValueError as e:
                raise as_gr_error(e, self.app.outputs_dir) from None
            finally:
                self._drop_cancel(session, cancel)
            if short is None:
                return {self.jump_note: "Stopped."}
            report = dataclasses.replace(report, short_runs=(*report.short_runs, short))
        return self._jump_at(report, k, files) | {self.jump_state: (report, files)}

    # -- branch --------------------------------------------------------------------------------------------------

    async def run_branch(self, http: gr.Request, branch_at: str, branch_n: float, branch_scheduler: str, **values):
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        try:
            at = [float(v) for v in str(branch_at).split(",") if v.strip()]
        except ValueError:
            raise gr.Error(f"branch points must be comma-separated fractions such as 0.1,0.5,0.9; got {branch_at!r}",
                           print_exception=False) from None
        if branch_scheduler != "main":
            request = dataclasses.replace(request, scheduler=branch_scheduler)
        n = _whole(branch_n, "branches per point")
        files = _Files(self.app, http)
        yield {self.branch_status: f"Running the trunk (seed {request.seed}, {request.scheduler or 'the model’s own scheduler'})…",
               self.branch_gallery: gr.Gallery(value=[], columns=n + 3),
               self.branch_progress: branch_progress(None, 1 + len(at) * n, n)}
        make = lambda c: explain.branch(request, at, n, loader=self.app.loader, cancelled=c,  # noqa: E731
                                        run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.branch_status, request)) is not None:
                    yield interim
                    continue
                items = []
                for i, p in enumerate(report.points):
                    items.append((files("trunk", report.trunk), f"f={p.fraction:g}: no branch"))
                    items += [(files(f"b{i}_{j}", im), f"f={p.fraction:g} · noise {j + 1}") for j, im in enumerate(p.images)]
                    items += [(files(f"bmean{i}", p.mean), f"f={p.fraction:g}: mean of the endings"),
                              (files(f"bx0{i}", p.x0), f"f={p.fraction:g}: x̂0, {p.x0_to_mean:.3f} from the mean")]
                rows = [{"f": p.fraction, "value": p.diversity, "series": BRANCH_SERIES[0]} for p in report.points]
                rows += [{"f": p.fraction, "value": p.x0_to_mean, "series": BRANCH_SERIES[1]} for p in report.points]
                kind = ("stochastic: each branch draws its own noise" if report.stochastic else
                        "deterministic: it adds no noise after the start, so every branch is the same image (diversity 0)")
                last = report.points[-1]
                yield {self.branch_gallery: gr.Gallery(value=items, columns=n + 3), self.branch_plot: _frame(rows, "f", BRANCH_SERIES),
                       self.numbers: report.to_dict(), self.branch_progress: branch_progress(report, 1 + len(at) * n, n),
                       self.branch_status: f"{'Done' if report.done else 'Running'}: {len(report.points)}/{len(report.at)} "
                                           f"branch points, seed {report.request.seed}; {report.scheduler} is {kind}. "
                                           f"Last: f={last.fraction:g} (from step {last.step + 1}), diversity {last.diversity:.4f}."}

    # -- sweep ---------------------------------------------------------------------------------------------------

    async def run_sweep(self, http: gr.Request, sweep_x: str, sweep_x_values: str, sweep_y: str, sweep_y_values: str, **values):
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        try:
            x = explain.parse_axis(f"{sweep_x}={sweep_x_values}")
            y = explain.parse_axis(f"{sweep_y}={sweep_y_values}") if sweep_y else None
        except ValueError as e:
            raise as_gr_error(e) from None
        files = _Files(self.app, http)
        total = len(x.values) * (len(y.values) if y else 1)
        yield {self.sweep_status: f"Running {counted(total, 'cell')}…", self.sweep_state: [],
               self.sweep_gallery: gr.Gallery(value=[], columns=len(x.values)),
               self.sweep_progress: sweep_progress(0, total)}
        make = lambda c: explain.sweep(request, x, y, loader=self.app.loader, cancelled=c,  # noqa: E731
                                       run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.sweep_status, request)) is not None:
                    yield interim
                    continue
                items = [(files(f"c{c.row}_{c.col}", c.image),
                          x.label(c.x) + ("" if y is None else f" · {y.label(c.y)}")) for c in report.cells]
                cells = [{"request": c.request.to_dict(), "seed": c.result.seed} for c in report.cells]
                yield {self.sweep_gallery: gr.Gallery(value=items, columns=len(x.values)), self.sweep_state: cells,
                       self.numbers: report.to_dict(),
                       self.sweep_progress: sweep_progress(len(report.cells), report.total, report.done),
                       self.sweep_status: f"{'Done' if report.done else 'Running'}: {len(report.cells)}/{counted(report.total, 'cell')}"
                                          + ("" if "seed" in (x.name, y.name if y else "") else
                                             f", seed {report.request.seed} in every cell") + "."}

    def on_cell(self, cells: list[dict], evt: gr.SelectData) -> dict:
        index = getattr(evt, "index", None)  # a call from outside the page may bring no event or no list
        if not isinstance(index, int) or not isinstance(cells, list) or not 0 <= index < len(cells):
            return {}
        cell = cells[index]
        return self.controls.restore(cell["request"], cell["seed"]) | {
            self.sweep_status: f"Loaded cell {index + 1} into the controls above (seed {cell['seed']}); "
                               "press Generate there to watch it form."}

    # -- dissect -------------------------------------------------------------------------------------------------

    async def run_dissect(self, http: gr.Request, **values):
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        files = _Files(self.app, http)
        yield {self.dissect_status: f"Running {counted(request.num_inference_steps, 'step')} (seed {request.seed})…",
               self.dissect_progress: progress_html(None, 1, f"the run: {counted(request.num_inference_steps, 'step')}…")}
        make = lambda c: explain.dissect(request, loader=self.app.loader, cancelled=c,  # noqa: E731
                                         max_image_bytes=self.image_bytes, run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.dissect_status, request,
                                        (self.dissect_progress, dissect_progress))) is not None:
                    yield interim
                    continue
                push = [{"step": s.step + 1, "value": s.guidance_delta_norm, "series": DISSECT_PUSH[0]}
                        for s in report.steps if s.guidance_delta_norm is not None]
                push += [{"step": s.step + 1, "value": s.effective_scale, "series": DISSECT_PUSH[1]} for s in report.steps]
                move = [{"step": s.step + 1, "value": s.x0_change, "series": DISSECT_MOVE[0]} for s in report.steps
                        if s.x0_change is not None]
                n = len(report.steps)
                flux = model_family(report.request.model, self.app.loader) == "flux"  # its two guidance scales
                if report.interval is not None:
                    where = (f"Guidance is on at steps {report.interval[0] + 1}–{report.interval[1] + 1} of {n} only: "
                             "outside them the model runs without the unconditional pass (scale 1).")
                elif not any(s.guided for s in report.steps):
                    where = ("No step ran the unconditional pass (guidance scale ≤ 1): conditional x̂0 only." if not flux
                             else f"Flux's distilled guidance (scale {report.request.guidance_scale:g}) is an input to "
                                  "the model: one pass per step, conditional x̂0 only; a True CFG scale above 1 adds "
                                  "a second pass on the negative prompt.")
                else:
                    scale = (f"true CFG scale {report.request.true_cfg_scale:g}, distilled guidance "
                             f"{report.request.guidance_scale:g}" if flux else f"scale {report.request.guidance_scale:g}")
                    where = f"Guidance is on at every step ({report.request.guidance}, {scale})."
                yield {self.dissect_push: _frame(push, "step", DISSECT_PUSH), self.dissect_move: _frame(move, "step", DISSECT_MOVE),
                       self.dissect_state: (report, files), self.numbers: report.to_dict(),
                       self.dissect_progress: dissect_progress(report),
                       self.dissect_status: f"Done: seed {report.request.seed}. {where}"} | self._dissect_at(report, max(1, n // 4),
                                                                                              files)

    def _dissect_at(self, report: explain.DissectReport, k: int, files: _Files) -> dict:
        """The three x̂0 at step k, written to the dissection's own folder (`files`), not one per slider move."""
        k = max(1, min(int(k), len(report.steps)))
        s = report.steps[k - 1]
        note = (f"Step {k} of {len(report.steps)}, σ = {s.sigma:.3g}: " if s.sigma is not None else f"Step {k}: ")
        note += (f"‖ε_c − ε_u‖ = {s.guidance_delta_norm:.3g}, scale {s.effective_scale:g}." if s.guided else
                 "no unconditional pass at this step (scale 1).")
        shown = report.images_near(k - 1)
        if shown.step != s.step:
            note += _thinned(shown.step, sum(t.x0 is not None for t in report.steps), len(report.steps))
        return {self.dissect_cond: None if shown.x0_cond is None else files(f"cond_{shown.step:03d}", shown.x0_cond),
                self.dissect_uncond: None if shown.x0_uncond is None else files(f"uncond_{shown.step:03d}", shown.x0_uncond),
                self.dissect_x0: files(f"x0_{shown.step:03d}", shown.x0), self.dissect_note: note,
                self.dissect_k: gr.Slider(1, len(report.steps), value=k)}

    def on_dissect_k(self, state, k):
        if state is None:
            return {self.dissect_note: "Run the experiment first."}
        try:
            k = _whole(k, "step k")
        except gr.Error as e:
            return {self.dissect_note: str(e.message)}
        report, files = state
        return self._dissect_at(report, k, files)

    # -- tradeoff ------------------------------------------------------------------------------------------------

    async def run_tradeoff(self, http: gr.Request, tradeoff_scales: str, tradeoff_seeds: float, **values):
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        try:
            scales = [float(v) for v in str(tradeoff_scales).split(",") if v.strip()]
            explain.check_judge_model(request.model)
            explain.judge_targets(request.prompt)
        except ValueError as e:
            raise gr.Error(str(e) if "could not convert" not in str(e) else
                           f"guidance scales must be comma-separated numbers, got {tradeoff_scales!r}",
                           print_exception=False) from None
        seeds = _whole(tradeoff_seeds, "seeds per scale")
        files = _Files(self.app, http)
        yield {self.tradeoff_status: f"Running {counted(len(scales), 'scale')} × {counted(seeds, 'seed')} (from seed {request.seed})…",
               self.tradeoff_gallery: gr.Gallery(value=[], columns=seeds),
               self.tradeoff_progress: tradeoff_progress(None, len(scales) * seeds, seeds)}
        make = lambda c: explain.tradeoff(request, scales, seeds, loader=self.app.loader, cancelled=c,  # noqa: E731
                                          run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.tradeoff_status, request)) is not None:
                    yield interim
                    continue
                items = [(files(f"g{i}_{j}", im), f"CFG {p.guidance_scale:g} · seed {s}")
                         for i, p in enumerate(report.points) for j, (s, im) in enumerate(zip(p.seeds, p.images))]
                rows = [{"guidance_scale": p.guidance_scale, "value": p.adherence, "series": TRADEOFF_SERIES[0]}
                        for p in report.points]
                rows += [{"guidance_scale": p.guidance_scale, "value": p.diversity, "series": TRADEOFF_SERIES[1]} for p in report.points]
                wanted = ", ".join(f"{k} {v}" for k, v in report.targets.items())
                yield {self.tradeoff_gallery: gr.Gallery(value=items, columns=seeds),
                       self.tradeoff_plot: _frame(rows, "guidance_scale", TRADEOFF_SERIES), self.numbers: report.to_dict(),
                       self.tradeoff_progress: tradeoff_progress(report, len(scales) * seeds, seeds),
                       self.tradeoff_status: f"{'Done' if report.done else 'Running'}: {len(report.points)}/"
                                             f"{counted(len(report.scales), 'scale')}; the judge checks {wanted}."}

    # -- attention -----------------------------------------------------------------------------------------------

    def _attention_tab(self) -> None:
        """The "Which word drew where" tab: word chips, a step slider, the word's map over x̂0 at step k and over the
        final image, and every word's whole-run map."""
        with gr.Tab("Which word drew where", elem_id="explain-attention-tab"):
            gr.Markdown(TEXT["attention"], elem_classes="step-note")
            self.attention_btn, self.attention_stop, self.attention_status, self.attention_progress = (
                run_controls("attention", "Run word maps"))
            self.attention_state = gr.State(None)
            self.attention_word = gr.Radio([], label="Word", elem_id="explain-attention-word")
            self.attention_k = StrictSlider(1, 20, value=20, step=1, label="Step k", elem_id="explain-attention-k")
            with gr.Row():
                for name, caption in (("x0", "the word at step k, over x̂0 at step k"),
                                      ("final", "the word over the whole run, over the final image")):
                    with gr.Column(min_width=160):
                        image = gr.Image(label=caption, show_label=False, type="filepath", height=260,
                                         interactive=False, elem_classes="pixelated",
                                         elem_id=f"explain-attention-{name}")
                        gr.Markdown(caption, elem_classes="caption")
                    setattr(self, f"attention_{name}", image)
            self.attention_note = gr.Markdown("", elem_classes="step-note", elem_id="explain-attention-note")
            gr.Markdown("Every word over the final image, the whole run, with its part of the words' attention "
                        "(click one to show it above):", elem_classes="step-note")
            self.attention_gallery = gr.Gallery(label="every word, whole run", show_label=False, columns=6,
                                                height="auto", elem_classes="explain-gallery", allow_preview=False,
                                                elem_id="explain-attention-gallery")

    async def run_attention(self, http: gr.Request, **values):
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        files = _Files(self.app, http)
        n = request.num_inference_steps
        yield {self.attention_status: f"Running {counted(n, 'step')} with the attention probes (seed {request.seed})…",
               self.attention_state: None, self.attention_gallery: [], self.attention_k: gr.Slider(1, n, value=n),
               self.attention_progress: progress_html(None, 1, f"the run: {counted(n, 'step')}…")}
        make = lambda c: explain.attention(request, loader=self.app.loader, cancelled=c,  # noqa: E731
                                           max_image_bytes=self.image_bytes, run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.attention_status, request,
                                        (self.attention_progress, attention_progress))) is not None:
                    yield interim
                    continue
                shares = report.shares()
                top = report.words[int(np.argmax(shares))]  # shown first: the word that drew the most attention
                n = len(report.steps)
                gallery = [(files(f"attn_{w.index}", report.overlay(w.index)), f"{w.text} · {share:.0%}")
                           for w, share in zip(report.words, shares)]
                yield {self.attention_gallery: gallery, self.attention_state: (report, files),
                       self.attention_word: gr.Radio(choices=[(w.text, w.index) for w in report.words],
                                                     value=top.index),
                       self.attention_k: gr.Slider(1, n, value=n), self.numbers: report.to_dict(),
                       self.attention_progress: attention_progress(report),
                       self.attention_status: f"Done: seed {report.request.seed}, {len(report.words)} words, "
                                              f"{report.layers} attention layers × {counted(n, 'step')}."
                       } | self._attention_at(report, top.index, n, files)

    def _attention_at(self, report: explain.AttentionReport, word: int, k: int, files: _Files) -> dict:
        """A word's map at step k over that step's x̂0, and over the whole run over the final image."""
        n = len(report.steps)
        k = max(1, min(int(k), n))
        w = report.word(word)
        s, shown = report.steps[k - 1], report.step_near(k - 1)
        sigma = "" if s.sigma is None else f" (σ = {s.sigma:.3g})"
        read = report.read
        where = ("where the image attended to it at this step" if read.reads(w.index, s.step) else
                 "not in the text read at this step, so nowhere")
        note = (f"“{w.text}” at step {k} of {n}{sigma}: {where}. Over the whole run it got "
                f"{report.shares()[w.index]:.0%} of the attention the prompt's words got.")
        if len(read.texts) > 1:  # a prompt schedule: say which of its texts this step reads
            note += f" Step {k} reads “{read.texts[read.text_at(s.step)]}”."
        if shown.step != s.step:
            note += _thinned(shown.step, sum(t.maps is not None for t in report.steps), n)
        return {self.attention_x0: files(f"attn_{w.index}_{shown.step:03d}", report.overlay(w.index, shown.step)),
                self.attention_final: files(f"attn_{w.index}", report.overlay(w.index)), self.attention_note: note}

    def on_attention_view(self, state, word, k):
        """The word chips and the step slider (dragged or typed): the chosen word at step k."""
        if state is None:
            return {self.attention_note: "Run the experiment first."}
        report, files = state
        try:
            k = _whole(k, "step k")
            return self._attention_at(report, report.words[0].index if word is None else _whole(word, "word"), k,
                                      files)
        except gr.Error as e:
            return {self.attention_note: str(e.message)}
        except ValueError as e:
            return {self.attention_note: str(e)}

    def on_attention_pick(self, state, k, evt: gr.SelectData) -> dict:
        """A click on a word in the gallery chooses it (the gallery lists the words in order)."""
        index = getattr(evt, "index", None)
        if state is None or not isinstance(index, int) or not 0 <= index < len(state[0].words):
            return {}
        return self.on_attention_view(state, index, k) | {self.attention_word: index}

    def _wire_attention_view(self) -> None:
        view = dict(api_visibility="private", trigger_mode="always_last", concurrency_id="explain-view",
                    concurrency_limit=4)
        outputs = [self.attention_x0, self.attention_final, self.attention_note]
        inputs = dict(state=self.attention_state, word=self.attention_word, k=self.attention_k)
        # .input: a chip clicked, the slider dragged or a number typed into its box (each keystroke; the last one
        # wins), never a value a run sets (.change would also fire then, with the old value under the new maximum)
        self.attention_word.input(self.on_attention_view, inputs_kwargs=inputs, outputs=outputs, **view)
        self.attention_k.input(self.on_attention_view, inputs_kwargs=inputs, outputs=outputs, **view)
        self.attention_gallery.select(self.on_attention_pick, inputs=[self.attention_state, self.attention_k],
                                      outputs=[*outputs, self.attention_word], **view)

    # -- layout --------------------------------------------------------------------------------------------------

    def _layout_tab(self) -> None:
        """The "When is the layout decided?" tab: the prompt's one [from:to:when] switched at several points, a row
        per seed, each image captioned with the judge's reading, and the words the readings support."""
        with gr.Tab("When is the layout decided?", elem_id="explain-layout-tab"):
            gr.Markdown(TEXT["layout"], elem_classes="step-note")
            with gr.Row():
                self.layout_prompt = gr.Textbox(LAYOUT_PROMPT, label="Prompt with one switch [from:to:when]", scale=3,
                                                info="its when (a number or WHEN) is replaced by each switch point; "
                                                     "the other settings are the main ones above",
                                                elem_id="explain-layout-prompt")
                self.layout_at = gr.Textbox(",".join(f"{f:g}" for f in explain.SWITCH_POINTS), scale=2,
                                            label="Switch points (shares of the steps, 0 to 1)")
                self.layout_seeds = StrictSlider(1, 6, value=1, step=1, label="Seeds (a row each)", scale=1)
            self.layout_btn, self.layout_stop, self.layout_status, self.layout_progress = (
                run_controls("layout", "Run the switch"))
            gr.Markdown("A column per switch point (when the new text starts to be read), a row per seed; under each "
                        "image, what the judge reads in it and whose it is: *from* (the old text) or *to* (the new).",
                        elem_classes="step-note")
            self.layout_gallery = gr.Gallery(label="a column per switch point", show_label=False, columns=6,
                                             height="auto", elem_classes="explain-gallery", allow_preview=False,
                                             elem_id="explain-layout-gallery")
            self.layout_words = gr.Markdown("", elem_classes="step-note", elem_id="explain-layout-words")

    async def run_layout(self, http: gr.Request, layout_prompt: str, layout_at: str, layout_seeds: float, **values):
        try:
            points = explain.parse_points(str(layout_at or ""))
            explain.check_judge_model(values["model"])
            values = values | {"prompt": switch_at(str(layout_prompt or ""), "0")}  # WHEN: replaced point by point
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        seeds = _whole(layout_seeds, "seeds")
        request = await asyncio.to_thread(self._request, values)  # may load the model: off the event loop
        files = _Files(self.app, http)
        total = len(points) * seeds
        yield {self.layout_status: f"Running {len(points)} switch points x {seeds} seed(s) (from seed {request.seed})…",
               self.layout_gallery: gr.Gallery(value=[], columns=len(points)), self.layout_words: "",
               self.layout_progress: progress_html(0, total, f"0 / {total} runs")}
        make = lambda c: explain.layout(request, points, seeds, loader=self.app.loader, cancelled=c,  # noqa: E731
                                        run_seconds=self.run_seconds)
        async with contextlib.aclosing(self._stream(request, make, http)) as reports:  # closed with the handler
            async for report in reports:
                if (interim := _interim(report, self.layout_status, request)) is not None:
                    yield interim
                    continue
                seed = (lambda c: f"seed {c.seed} · ") if seeds > 1 else (lambda c: "")  # noqa: E731
                items = [(files(f"layout_{c.seed}_{k}", c.image),
                          f"{seed(c)}{layout_column(c.fraction, c.switch_step)} · {layout_caption(c, report.changes)}")
                         for c in report.cells for k in [report.fractions.index(c.fraction)]]
                changes = ", ".join(f"{k}: {b} → {a}" for k, (b, a) in report.changes.items())
                done = len(report.cells)
                yield {self.layout_gallery: gr.Gallery(value=items, columns=len(points)),
                       self.layout_words: report.words() if report.done else "", self.numbers: report.to_dict(),
                       self.layout_progress: progress_html(done, total, f"{done} / {total} runs", _state(report.done)),
                       self.layout_status: f"{'Done' if report.done else 'Running'}: {done} / {total} runs, seed "
                                           f"{request.seed}; the switch changes {changes}."}

    # -- wiring --------------------------------------------------------------------------------------------------

    def wire(self) -> None:
        inputs = self.controls.inputs
        # Each experiment waits on the one generation worker, job by job, beside the others: the concurrency limit
        # only bounds how many wait there (above the per-client limit, so one client cannot take every slot), and
        # the validator counts an event against its client when it is queued (ui/clients.py).
        validate = admission_validator(self.app)
        common = dict(show_progress="minimal", concurrency_id="explain", concurrency_limit=EXPLAIN_CONCURRENCY,
                      trigger_mode="once", validator=validate)
        # Outputs in API order: the status first and the numbers last, as before the progress bars came (just
        # before the numbers).
        runs = [
            ("explain_jump", self.jump_btn, self.jump_stop, self.run_jump, {}, self.jump_status,
             [self.jump_status, self.jump_state, self.jump_gallery, self.jump_k, self.jump_distance,
              self.jump_sharpness, self.jump_bands, self.jump_compare, self.jump_short, self.jump_note, self.jump_progress, self.numbers]),
            ("explain_branch", self.branch_btn, self.branch_stop, self.run_branch,
             dict(branch_at=self.branch_at, branch_n=self.branch_n, branch_scheduler=self.branch_scheduler),
             self.branch_status, [self.branch_status, self.branch_gallery, self.branch_plot, self.branch_progress,
                                  self.numbers]),
            ("explain_sweep", self.sweep_btn, self.sweep_stop, self.run_sweep,
             dict(sweep_x=self.sweep_x, sweep_x_values=self.sweep_x_values, sweep_y=self.sweep_y,
                  sweep_y_values=self.sweep_y_values),
             self.sweep_status, [self.sweep_status, self.sweep_state, self.sweep_gallery, self.sweep_progress,
                                 self.numbers]),
            ("explain_dissect", self.dissect_btn, self.dissect_stop, self.run_dissect, {}, self.dissect_status,
             [self.dissect_status, self.dissect_state, self.dissect_push, self.dissect_move, self.dissect_k,
              self.dissect_cond, self.dissect_uncond, self.dissect_x0, self.dissect_note, self.dissect_progress,
              self.numbers]),
            ("explain_tradeoff", self.tradeoff_btn, self.tradeoff_stop, self.run_tradeoff,
             dict(tradeoff_scales=self.tradeoff_scales, tradeoff_seeds=self.tradeoff_seeds), self.tradeoff_status,
             [self.tradeoff_status, self.tradeoff_gallery, self.tradeoff_plot, self.tradeoff_progress, self.numbers]),
        ]
        runs.append(("explain_attention", self.attention_btn, self.attention_stop, self.run_attention, {},
                     self.attention_status, [self.attention_status, self.attention_state, self.attention_word,
                                             self.attention_k, self.attention_x0, self.attention_final,
                                             self.attention_gallery, self.attention_note, self.attention_progress,
                                             self.numbers]))
        runs.append(("explain_layout", self.layout_btn, self.layout_stop, self.run_layout,
                     dict(layout_prompt=self.layout_prompt, layout_at=self.layout_at, layout_seeds=self.layout_seeds),
                     self.layout_status, [self.layout_status, self.layout_gallery, self.layout_words,
                                          self.layout_progress, self.numbers]))
        self._wire_attention_view()
        jump_k = self.jump_k.release(self.gpu(self._counted(self.on_jump_k)),
                                     inputs_kwargs=dict(state=self.jump_state, k=self.jump_k),
                                     outputs=[self.jump_compare, self.jump_short, self.jump_note, self.jump_k,
                                              self.jump_state], api_visibility="private", trigger_mode="always_last",
                                     concurrency_id="explain", concurrency_limit=EXPLAIN_CONCURRENCY, validator=validate)
        for name, button, stop, fn, extra, status, outputs in runs:
            event = button.click(self.gpu(self._counted(fn)), inputs_kwargs=extra | inputs, outputs=outputs,
                                 api_name=name, show_progress_on=status, **common)
            cancels = [event, jump_k] if name == "explain_jump" else [event]
            stop.click(self.stop, outputs=[status], cancels=cancels, queue=False, api_visibility="private")
        self.dissect_k.release(self.on_dissect_k, inputs_kwargs=dict(state=self.dissect_state, k=self.dissect_k),
                               outputs=[self.dissect_cond, self.dissect_uncond, self.dissect_x0, self.dissect_note,
                                        self.dissect_k], api_visibility="private", trigger_mode="always_last",
                               concurrency_id="explain-view", concurrency_limit=4)
        self.sweep_gallery.select(self.on_cell, inputs=[self.sweep_state],
                                  outputs=[*self.controls.restore_outputs, self.sweep_status], api_visibility="private")
