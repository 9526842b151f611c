"""The live view and the scrubber: status line, live x_t / channels / x̂0 / final image, and after the run a
slider over the steps with the guided, conditional and unconditional x̂0 and the guidance heat map.

The Generate handler is a generator: it queues the run on the app's one generation worker and yields only the
newest step's previews (file paths, throttled), then the final image; a follow-up event opens the scrubber.

Why two events: Gradio turns every output a yield leaves out into `gr.skip()`, an update it serves by building a
new component and its API schema (~2 ms each here, measured with py-spy). With the stream's 27 outputs that
was ~50 ms of the server's Python per live preview, taken from the denoising loop. So the stream has only the
few outputs it changes and sends all of them every time, and the scrubber, plots, code and history follow in
`after_run`, once the image is on screen.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, TypeVar

import gradio as gr
import pandas as pd  # a Gradio dependency

from pipelines.errors import client_message
from pipelines.explain.common import seeded
from pipelines.outputs import image_name
from pipelines.types import GenerationResult, StepEvent
from pipelines.words import counted
from ui.render import diffusers_code
from ui.sliders import StrictSlider
from ui.state import Playground, Run, kind_label
from ui.theme import RESULT_INTO_VIEW_JS, captioned_image, progress_bar, progress_html

log = logging.getLogger("playground")
T = TypeVar("T")

# After a live preview took r seconds, the next waits >= RENDER_SHARE·r: previews, which compete with the
# denoising loop for the CPU, stay under ~1/13 of the run.
RENDER_SHARE = 12
KEEPALIVE_SECONDS = 1.0  # a handler waiting on a run yields this often, so Gradio can see its client is gone
STOP_WAIT = 10.0  # seconds Stop waits for the run to reach a step boundary before it reports back
STEP_COLUMNS = ["step", "timestep", "σ", "‖ε_c − ε_u‖", "effective scale"]  # the per-step table
FINAL_CAPTION = "Final image"  # the final image's caption, unless the run was stopped (final_caption)
WHY = ("**Why many small steps?** At the first step x̂0 is the model's best guess from pure noise: the *average* of "
       "every image that fits the prompt, a blur in which what the prompt leaves open (a background it does not "
       "name, the exact outline) is a mix of everything it could still become. Jumping straight to it gives that "
       "blur. Each small step commits to a little more, re-noises less, and asks again, so the average sharpens into "
       "one image. Scrub from step 1 to the end and watch x̂0 go from average to specific, or try the Explain lab "
       "below. The heat map shows where the prompt pushes hardest (brighter = larger cond − uncond difference, on one "
       "scale for the whole run).")


def error_text(error: BaseException, outputs_dir=None) -> str:
    """One client-safe line: a ValueError (bad input) says what is allowed; anything else is logged here and shown
    only by its kind, never with server paths or library internals (pipelines.errors.client_message)."""
    if isinstance(error, gr.Error):
        return str(error.message)
    if not isinstance(error, ValueError):
        log.error("generation failed", exc_info=error)
    return client_message(error, outputs_dir)


def as_gr_error(error: BaseException, outputs_dir=None) -> gr.Error:
    return error if isinstance(error, gr.Error) else gr.Error(error_text(error, outputs_dir), print_exception=False)


class LiveView:
    """Status, live previews, final image, scrubber, diffusers code."""

    def __init__(self, app: Playground) -> None:
        self.app = app
        self.run_id = gr.State("")
        self.status = gr.Markdown("Ready.", elem_id="live-status")
        self.progress = progress_bar("live-progress")
        with gr.Row():
            self.live_latents, self.cap_latents = captioned_image("Latents x_t", 200, elem_id="live-latents")
            self.live_channels, self.cap_channels = captioned_image("Latent channels", 200, elem_id="live-channels")
            self.live_x0, self.cap_x0 = captioned_image("Predicted x̂0", 200, elem_id="live-x0")
            self.final_image, self.cap_final = captioned_image(FINAL_CAPTION, 200, elem_id="final-image", type="filepath",
                                                               buttons=["download", "fullscreen"])
        # A batch's images, image i from seed + i, each PNG with the request that makes it alone (hidden for one).
        self.batch = gr.Gallery(visible=False, label="Batch", columns=8, fit_columns=False, height="auto", object_fit="contain",
                                allow_preview=True, type="filepath", elem_id="batch", elem_classes="pixelated")
        with gr.Group(visible=False) as self.scrub_group:
            self.scrub = StrictSlider(1, 2, value=1, step=1, label="Scrub through the steps", elem_id="scrub")
            self.step_info = gr.Markdown(elem_id="step-info")
            with gr.Row():
                self.scrub_latents, self.cap_s_latents = captioned_image("x_t", 150, elem_id="scrub-latents")
                self.scrub_x0, self.cap_s_x0 = captioned_image("x̂0 (guided)", 150, elem_id="scrub-x0")
                self.scrub_cond, self.cap_s_cond = captioned_image("x̂0 conditional", 150, elem_id="scrub-cond")
                self.scrub_uncond, self.cap_s_uncond = captioned_image("x̂0 unconditional", 150, elem_id="scrub-uncond")
                self.scrub_delta, _ = captioned_image("|x̂0 cond − uncond|", 150, elem_id="scrub-delta")
            gr.Markdown(WHY, elem_classes="step-note")
            with gr.Accordion("Per-step numbers", open=False):
                with gr.Row():
                    self.sigma_plot = gr.LinePlot(x="step", y="sigma", y_title="σ", label="Noise level σ per step",
                                                  height=200)
                    self.delta_plot = gr.LinePlot(x="step", y="delta", y_title="‖ε_c − ε_u‖", height=200,
                                                  label="Guidance difference ‖ε_c − ε_u‖ per step")
                self.steps_table = gr.Dataframe(headers=STEP_COLUMNS, elem_id="steps-table", interactive=False,
                                                wrap=True, max_height=260)
        with gr.Accordion("diffusers code that reproduces this image", open=False):
            self.code = gr.Code(language="python", interactive=False, label="diffusers", elem_id="diffusers-code")
        # In the browser only: on a phone the final image is brought into view as a run starts and ends.
        self.final_image.change(None, js=RESULT_INTO_VIEW_JS, queue=False, show_progress="hidden",
                                api_visibility="private")

    # -- outputs ---------------------------------------------------------------------------------------

    @property
    def live_outputs(self) -> list:
        """What the Generate stream updates; every yield sends all of them (see the module docstring)."""
        return [self.status, self.live_latents, self.live_channels, self.live_x0, self.final_image, self.cap_latents,
                self.cap_x0, self.run_id, self.cap_final, self.progress]

    @property
    def after_outputs(self) -> list:
        """What `after_run` fills in once the image is shown."""
        return [self.scrub_group, self.scrub, self.step_info, self.scrub_latents, self.scrub_x0, self.scrub_cond,
                self.scrub_uncond, self.scrub_delta, self.steps_table, self.sigma_plot, self.delta_plot, self.code,
                self.batch,
                self.cap_s_latents, self.cap_s_x0, self.cap_s_cond, self.cap_s_uncond]

    @property
    def outputs(self) -> list:
        """Everything (Stop and restoring a past run update the lot)."""
        return [self.status, self.live_latents, self.live_channels, self.live_x0, self.final_image, self.scrub_group,
                self.scrub, self.step_info, self.scrub_latents, self.scrub_x0, self.scrub_cond, self.scrub_uncond,
                self.scrub_delta, self.steps_table, self.sigma_plot, self.delta_plot, self.code, self.run_id,
                self.cap_latents, self.cap_x0, self.cap_s_latents, self.cap_s_x0, self.cap_s_cond, self.cap_s_uncond,
                self.cap_final, self.progress, self.batch]

    def cleared(self, status: str) -> dict:
        """Every preview emptied (nothing stale from the last run stays on screen) and `status` shown."""
        return {self.status: status, self.live_latents: None, self.live_channels: None, self.live_x0: None,
                self.final_image: None, self.scrub_group: gr.Group(visible=False), self.code: "", self.run_id: "",
                self.cap_latents: "Latents x_t", self.cap_x0: "Predicted x̂0", self.cap_final: FINAL_CAPTION,
                self.progress: ""}

    def error(self, error: BaseException) -> dict:
        return self.cleared(f"⚠️ **Error:** {error_text(error, self.app.outputs_dir)}")

    def captions(self, run: Run) -> dict:
        p = run.previewer
        live_x0 = kind_label(p, run.live_x0_kind)
        return {self.cap_latents: f"Latents x_t · {kind_label(p, run.latents_kind)}",
                self.cap_x0: f"Predicted x̂0 · {live_x0}",
                self.cap_s_latents: f"x_t · {kind_label(p, run.latents_kind)}",
                self.cap_s_x0: f"x̂0 (guided) · {kind_label(p, run.x0_kind)}",
                self.cap_s_cond: f"x̂0 conditional · {kind_label(p, run.x0_kind)}",
                self.cap_s_uncond: f"x̂0 unconditional · {kind_label(p, run.x0_kind)}"}

    def finished(self, run: Run, result: GenerationResult) -> dict:
        """Outputs once the image exists: final image, status, seed, code."""
        return {
            self.status: finished_status(run, result),
            self.final_image: str(run.folder / "image.png"),
            self.run_id: run.run_id,
            self.cap_final: final_caption(result.cancelled, result.steps_completed),
            self.progress: result_progress(result),
        }

    def scrubber(self, run: Run) -> dict:
        """The scrubber, opened at the last step; the live view ends on the last step too, in the scrubber's kinds."""
        n = len(run.steps)
        if not n:
            return {self.scrub_group: gr.Group(visible=False)}
        app = self.app
        live = {self.live_latents: app.render(run, n - 1, "latents"), self.live_channels: app.render(run, n - 1, "channels"),
                self.live_x0: app.render(run, n - 1, "x0")}
        live[self.cap_x0] = f"Predicted x̂0 · {kind_label(run.previewer, run.x0_kind)}"
        return self.captions(run) | live | self.scrub_panel(run) | {self.run_id: run.run_id}

    def scrub_panel(self, run: Run) -> dict:
        """The scrubber's group, slider, step images, captions and plots, at the last step."""
        n = len(run.steps)
        if not n:
            return {self.scrub_group: gr.Group(visible=False)}
        captions = {k: v for k, v in self.captions(run).items() if k in self.after_outputs}
        # Sent with the group's visibility: updates to children of a hidden group are lost in the browser.
        return captions | self.scrub_outputs(run, n - 1) | self.step_plots(run) | {
            self.scrub_group: gr.Group(visible=True),
            self.scrub: gr.Slider(1, max(n, 2), value=n, step=1, interactive=n > 1)}

    def step_plots(self, run: Run) -> dict:
        # σ = ∞ (the first step of a zero-terminal-SNR schedule) has no place on a plot; the table shows it
        sigma_rows = [(s.step + 1, s.sigma) for s in run.steps if s.sigma is not None and s.sigma < float("inf")]
        delta_rows = [(s.step + 1, s.guidance_delta_norm) for s in run.steps if s.guidance_delta_norm is not None]
        return {self.sigma_plot: pd.DataFrame(sigma_rows, columns=["step", "sigma"]),
                self.delta_plot: pd.DataFrame(delta_rows, columns=["step", "delta"]),
                self.steps_table: pd.DataFrame(self.app.step_table(run), columns=STEP_COLUMNS)}

    def scrub_outputs(self, run: Run, step: int) -> dict:
        app = self.app
        return {self.scrub_latents: app.render(run, step, "latents"), self.scrub_x0: app.render(run, step, "x0"),
                self.scrub_cond: app.render(run, step, "x0_cond"), self.scrub_uncond: app.render(run, step, "x0_uncond"),
                self.scrub_delta: app.render(run, step, "delta"), self.step_info: app.step_text(run, step)}

    # -- streaming -------------------------------------------------------------------------------------

    def stream(self, run: Run) -> Iterator[dict]:
        """Yield the newest step's previews while `run` goes (throttled), then the result with the last step's
        previews. Every yield covers all of `live_outputs`. Leaving early (browser gone, Stop) cancels the run at
        the next step."""
        app = self.app
        shown = {c: None for c in self.live_outputs}

        def show(update: dict) -> dict:
            shown.update((c, v) for c, v in update.items() if c in shown)
            return dict(shown)

        try:
            yield show(self.cleared(starting_status(app, run)) | {self.progress: waiting_progress(run)})
            captioned = False
            for item in live_steps(app, run, lambda event: self.previews(run, event.step)):
                if isinstance(item, int):
                    yield show({self.status: waiting_status(item)})
                    continue
                event, out = item
                out[self.status] = step_status(event)
                out[self.progress] = step_progress(event)
                if not captioned:
                    out |= self.captions(run)
                    captioned = True
                yield show(out)
            run.done.wait()
            if run.error is not None:
                gr.Warning(error_text(run.error, app.outputs_dir))
                yield show(self.error(run.error))
                return
            assert run.result is not None
            yield show(self.finished(run, run.result) | self.captions(run))  # the image first, as soon as it exists
            if run.steps:  # then the live panels end on the last step
                yield show(self.previews(run, len(run.steps) - 1))
        finally:  # the browser left or Stop cancelled this generator: stop the worker at the next step
            if not run.done.is_set():
                run.latest.cancel()

    def previews(self, run: Run, step: int) -> dict:
        """The live panels at `step`, in the live kinds (the cheap faithful preview on a CPU)."""
        app = self.app
        return {self.live_latents: app.render(run, step, "latents"), self.live_channels: app.render(run, step, "channels"),
                self.live_x0: app.render(run, step, "x0_live")}

    def hide_scrubber(self) -> dict:
        """As a run starts: the last run's scrubber and batch go at once."""
        return {self.scrub_group: gr.Group(visible=False), self.batch: gr.Gallery(visible=False)}

    def after_run(self, rid: str) -> dict:
        """After the stream: the scrubber, plots and code of run `rid` (hidden when there is none, e.g. an error)."""
        run = self.app.runs.get(rid)
        out = {c: gr.skip() for c in self.after_outputs}
        if run is None or run.result is None or not run.steps:
            return out | {self.scrub_group: gr.Group(visible=False), self.code: "", self.batch: gr.Gallery(visible=False)}
        code = diffusers_code(run.result, run.previewer.pipe.dtype, self.app.loader.device.type)
        return out | self.scrub_panel(run) | {self.code: code, self.batch: batch_gallery(run.folder, run.result.seeds)}

    def stop(self, session: str | None) -> dict:
        """Cancel this session's run at the next step boundary, then show what it made so far."""
        run = self.app.stop(session)
        if run is None:
            return {self.status: "Nothing to stop: no run of yours is in progress."}
        if not run.done.wait(STOP_WAIT):
            return {self.status: "Stopping… (the model is still loading; the run stops before its first step)"}
        if run.error is not None or run.result is None:
            return self.cleared(f"Stopped. {error_text(run.error, self.app.outputs_dir) if run.error else ''}".strip())
        return self.finished(run, run.result) | self.scrubber(run) | {
            self.code: diffusers_code(run.result, run.previewer.pipe.dtype, self.app.loader.device.type),
            self.batch: batch_gallery(run.folder, run.result.seeds)}

    def on_scrub(self, step: float, rid: str) -> dict:
        run = self.app.runs.get(rid)
        if run is None or not run.steps:
            return {self.step_info: "This run is no longer in memory; its image and settings are in the history."}
        return self.scrub_outputs(run, min(max(int(step) - 1, 0), len(run.steps) - 1))

    def wire_scrub(self) -> None:
        self.scrub.change(self.on_scrub, inputs_kwargs=dict(step=self.scrub, rid=self.run_id),
                          outputs=[self.scrub_latents, self.scrub_x0, self.scrub_cond, self.scrub_uncond,
                                   self.scrub_delta, self.step_info],
                          show_progress="hidden", trigger_mode="always_last", api_visibility="private")


def starting_status(app: Playground, run: Run) -> str:
    """The status line before the first step."""
    return "Loading model…" if app.loader.loaded(run.request.model) is None else "Starting…"


def waiting_status(ahead: int) -> str:
    return f"Waiting: {ahead} run{'s' if ahead != 1 else ''} ahead of yours…"


def step_status(event: StepEvent) -> str:
    """The status line while a step's previews are shown: step, speed so far, noise level."""
    rate = (event.step + 1) / event.elapsed if event.elapsed > 0 else 0.0
    sigma = f" · σ = {event.sigma:.3g}" if event.sigma is not None else ""
    return f"Step {event.step + 1} / {event.num_steps} · {rate:.1f} it/s{sigma}"


def waiting_progress(run: Run) -> str:
    """The bar before the first step: how far is not known yet (a queued or loading run)."""
    return progress_html(None, 1, "not started yet")


def step_progress(event: StepEvent) -> str:
    """The bar while a run goes: the fraction of its loop iterations done (the step shown)."""
    return progress_html(event.step + 1, event.num_steps, f"step {event.step + 1} / {event.num_steps}")


def result_progress(result: GenerationResult) -> str:
    """The bar once the image exists: every step done, or where it stopped."""
    k, n = result.steps_completed, max(result.num_steps, 1)
    if result.cancelled:
        return progress_html(k, n, f"stopped at step {k} / {result.num_steps}", "stopped")
    return progress_html(k, n, f"step {k} / {result.num_steps}", "done")


def final_caption(cancelled: bool, steps_completed: int) -> str:
    """The final image's caption: a stopped run's image is the x̂0 of its last step (generate() decodes it), or the
    starting noise when it stopped before the first."""
    if not cancelled:
        return FINAL_CAPTION
    if steps_completed == 0:
        return "Stopped before the first step — the starting noise x_T shown"
    return f"Stopped at step {steps_completed} — x̂0 shown"


def batch_gallery(folder, seeds) -> dict | Any:
    """The batch gallery for a run folder whose images have `seeds` (image i: seed + i): shown for a batch, hidden
    for one image (the final panel shows it)."""
    if len(seeds) < 2:
        return gr.Gallery(visible=False)
    return gr.Gallery([(str(folder / image_name(i)), f"{i + 1} · seed {s}") for i, s in enumerate(seeds)],
                      visible=True, label=f"Batch: {len(seeds)} images, image i uses seed + i (each PNG alone "
                                          f"reproduces it)")


def finished_status(run: Run, result: GenerationResult) -> str:
    """The status line once the image exists (done, or stopped and why)."""
    t = result.timings
    rate = result.steps_completed / t.denoise if t.denoise > 0 else 0.0
    what = (f"Stopped at step {result.steps_completed} of {result.num_steps}" if result.cancelled
            else f"Done: {counted(result.steps_completed, 'step')}")
    seeds = result.seeds
    seed = f"seed {result.seed}" if len(seeds) == 1 else f"{len(seeds)} images, seeds {seeds[0]}–{seeds[-1]}"
    if result.cancelled and run.time_limit is not None and run.time_limit.expired:
        what += (f" (runs here may take at most {run.time_limit.seconds:g} s; the server's "
                 f"PLAYGROUND_MAX_RUN_SECONDS sets it)")
    return (f"{what} in {t.denoise:.2f} s ({rate:.1f} it/s), {result.width}×{result.height}, "
            f"{result.scheduler}, {seed}. Saved as run `{run.run_id}`.")


def live_steps(app: Playground, run: Run, render: Callable[[StepEvent], T]) -> Iterator[int | tuple[StepEvent, T]]:
    """While `run` goes: `(event, render(event))` for the newest step, stale steps skipped, at least
    app.preview_interval and RENDER_SHARE × the last render's time apart; while it waits in the worker's queue,
    the number of runs ahead of it whenever that changes. The last step is left out (its previews come with the
    result, a moment later). Ends once the run is done; its outcome is then on `run`. The one throttle of the
    Generate button's stream and of /generate_stream."""
    next_at = 0.0
    ahead = 0
    while not run.done.is_set():
        event = run.latest.take(timeout=0.25)
        if event is None and run.thread is None:  # still queued: say where, when that changes
            now_ahead = app.ahead_of(run)
            if now_ahead != ahead and now_ahead:
                yield now_ahead
            ahead = now_ahead
        if event is None or event.step + 1 == event.num_steps:
            continue  # the last step's previews come with the result, a moment later
        now = time.perf_counter()
        if now < next_at:  # too soon: wait, then show whatever is newest by then
            if run.done.wait(next_at - now):
                break  # finished meanwhile: the result (with the last step's previews) comes next
            event = run.latest.take(timeout=0) or event
        t0 = time.perf_counter()
        rendered = render(event)
        spent = time.perf_counter() - t0  # rendering only: the caller's yield waits on Gradio and the client
        yield event, rendered
        next_at = time.perf_counter() + max(app.preview_interval, RENDER_SHARE * spent)


def admission_validator(app: Playground) -> Callable:
    """Gradio's `validator` for an event that runs the model: called when the event is pushed, before it is queued,
    it counts the event against its client (ui/clients.py) and refuses the excess at once with a line that names
    PLAYGROUND_MAX_RUNS_PER_CLIENT, so one address cannot fill the queue. It takes the event's inputs and ignores them."""

    def validate(http: gr.Request, **inputs: Any) -> Any:
        # Gradio wants one value per input back; a refusal is a validation message on the first input (HTTP 422:
        # the page shows it at that field, gradio_client raises ValidationError with it).
        try:
            app.admission.reserve(app.client_of(http))
            verdict = [gr.validate(True, "")] * len(inputs)
        except ValueError as e:
            verdict = [gr.validate(False, str(e))] + [gr.validate(True, "")] * (len(inputs) - 1)
        return verdict[0] if len(verdict) == 1 else tuple(verdict)

    return validate


def generate_handler(app: Playground, controls, live: LiveView, gpu: Callable) -> Callable:
    """The Generate button's streaming handler: widgets -> request -> worker -> previews. Its outputs are
    `[*live.live_outputs, controls.seed]`, all sent on every yield."""

    @gpu
    def run_ui(http: gr.Request, **values: Any):
        seed = values.get("seed")
        try:
            with app.admission.hold(app.client_of(http)):  # a ValueError when this client has too many going
                request, x0_choice = controls.request(values)
                request = seeded(request)  # drawn now rather than in generate(): the seed field shows it at once
                run = app.start(request, x0_choice, getattr(http, "session_hash", None), app.client_of(http))
                for out in live.stream(run):
                    yield out | {controls.seed: request.seed}
        except ValueError as e:
            gr.Warning(str(e))
            yield {c: v for c, v in live.error(e).items() if c in live.live_outputs} | {controls.seed: seed}

    return run_ui
