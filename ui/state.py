"""What the views share (no Gradio): the loader and the one generation worker, runs in flight and finished,
and the per-step preview PNGs rendered once and reused by the live view, the scrubber and restores."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import LatestObserver, StepRecorder, TeeObserver, TimeLimit
from pipelines.limits import Limits
from pipelines.outputs import (STEP_TENSORS_LIMIT, Trace, TraceWriter, load_step_tensors, prune_outputs,
                               save_png)
from pipelines.previews import Previewer
from pipelines.registry import MODELS
from pipelines.requests import OWN_SCHEDULER, build_request, missing_embedded
from pipelines.schedulers import SCHEDULERS, compatible_keys, describe_choice, folder_config
from pipelines.types import GenerationRequest, GenerationResult, StepEvent
from pipelines.worker import GenerationWorker, generate_here, load_here
from ui.render import guidance_map, heat, upscale

log = logging.getLogger("playground")

MAX_RUNS_IN_MEMORY = 8  # finished runs kept for scrubbing
# Step tensors held for scrubbing: per run (past it a run keeps every 2nd, 4th, ... step; the embedded model's
# 1000-step run needs 16 MB, an SDXL 1024² step 1 MB) and for all runs in memory together (oldest dropped first).
SCRUB_BYTES_PER_RUN = 48 * 2**20
SCRUB_BYTES_TOTAL = 192 * 2**20
PREVIEW_NAMES = ("latents", "channels", "x0", "x0_live", "x0_cond", "x0_uncond", "delta")


@dataclass
class Run:
    """A run in flight or finished: its folder, observers, and the outcome the worker leaves behind."""

    request: GenerationRequest
    folder: Path
    x0_choice: str  # "auto", "decode" or "fast" as the user chose
    latest: LatestObserver = field(default_factory=LatestObserver)
    recorder: StepRecorder = field(default_factory=lambda: StepRecorder(max_bytes=SCRUB_BYTES_PER_RUN))
    done: threading.Event = field(default_factory=threading.Event)
    previewer: Previewer | None = None  # set by the worker once the model is loaded
    latents_kind: str = "channels"  # preview of x_t
    x0_kind: str = "channels"  # preview of x̂0 in the scrubber
    live_x0_kind: str = "channels"  # x̂0 preview while the run is going
    result: GenerationResult | None = None
    error: BaseException | None = None
    renders: dict[tuple[int, str], str | None] = field(default_factory=dict)  # preview PNG paths by (step, name)
    heat_top: float = 0.0  # largest |x̂0_cond − x̂0_uncond| over the run, so heat maps compare across steps
    thread: threading.Thread | None = None  # the thread that ran generate() (the app's one worker)
    client: str | None = None  # who asked (an IP address), for the per-client limit
    time_limit: TimeLimit | None = None  # set when the run starts; `.expired` tells whether it stopped the run
    _on_done: list = field(default_factory=list)  # callables run (on the worker) once `done` is set

    async def wait(self) -> None:
        """Wait in an event loop until the run is done, without holding a thread. Cancelling the waiting task
        (a client that cancels or goes away) cancels the run at its next step boundary."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        self._on_done.append(lambda: loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None)))
        if self.done.is_set():
            return
        try:
            await finished
        except asyncio.CancelledError:
            self.latest.cancel()
            raise

    def finish(self) -> None:
        """Mark the run done and tell whoever waits (the stream, the API handler)."""
        self.done.set()
        self.latest.wake()
        for notify in self._on_done:
            notify()

    @property
    def run_id(self) -> str:
        return self.folder.name

    @property
    def steps(self) -> list[StepEvent]:
        return self.recorder.steps


def kind_label(previewer: Previewer | None, kind: str) -> str:
    """What a panel shows, in words, for its caption."""
    return previewer.label(kind) if previewer is not None else kind


class Playground:
    """Shared state behind the page; one instance per build_demo()."""

    def __init__(self, loader: ModelLoader, models: list[str], default_model: str, outputs_dir: Path,
                 preview_interval: float, worker: GenerationWorker | None = None,
                 scrub_bytes_per_run: int = SCRUB_BYTES_PER_RUN, scrub_bytes_total: int = SCRUB_BYTES_TOTAL,
                 max_runs_per_client: int | None = None, limits: Limits | None = None) -> None:
        """max_runs_per_client: runs one client (IP) may have waiting or running at once (None: no limit);
        limits: the work budget every request is built under, the wall-clock limit of a run and what the outputs
        folder keeps (default: Limits(), the built-in defaults)."""
        self.loader = loader
        self.models = models
        self.default_model = default_model
        self.outputs_dir = outputs_dir
        self.preview_interval = preview_interval
        self.worker = worker or GenerationWorker()
        self.scrub_bytes_per_run = scrub_bytes_per_run
        self.max_runs_per_client = max_runs_per_client
        self.limits = limits or Limits()
        self.pending: list[Run] = []  # queued or running, in the worker's order
        self.experiments: dict[str, int] = {}  # client -> Explain-lab experiments it has going
        self.scrub_bytes_total = scrub_bytes_total
        self.runs: OrderedDict[str, Run] = OrderedDict()  # finished runs kept for scrubbing
        self.active: dict[str, Run] = {}  # session hash -> run in flight (for Stop)
        self._lock = threading.Lock()

    # -- choices ---------------------------------------------------------------------------------------

    def scheduler_choices(self, model: str) -> list[tuple[str, str]]:
        """(label, key) for the schedulers that fit `model`, each saying whether it is stochastic and what a step costs."""
        pipe = self.loader.loaded(model)
        if pipe is not None:
            keys = compatible_keys(pipe.scheduler)
        elif model in MODELS:  # a local folder says what fits without loading weights; a hub id, its family
            config = folder_config(MODELS[model].source)
            kind = "flow" if MODELS[model].family == "sd3" else "discrete"
            keys = compatible_keys(config) if config is not None else [k for k, s in SCHEDULERS.items() if s.kind == kind]
        else:
            keys = list(SCHEDULERS)
        scheduler = pipe.scheduler if pipe is not None else None
        own = f"model default — {describe_choice(None, scheduler).split(' — ', 1)[1]}" if pipe is not None else "model default"
        return [(own, OWN_SCHEDULER), *((describe_choice(k, scheduler), k) for k in keys)]

    def missing_embedded(self, model: str) -> str | None:
        if self.loader.loaded(model) is not None:
            return None
        return missing_embedded(model)

    def check_offered(self, model: str) -> None:
        """Refuse a model outside this app's list (the UI and both API endpoints ask before building a request)."""
        if model not in self.models:
            raise ValueError(f"model {model!r} is not offered here; choose one of: {', '.join(self.models)}")

    # -- running ---------------------------------------------------------------------------------------

    def start(self, request: GenerationRequest, x0_choice: str, session: str | None, client: str | None = None) -> Run:
        """Queue the run on the generation worker; its LatestObserver receives the steps. Refuses (ValueError) a
        client that already has max_runs_per_client runs waiting or running."""
        # 96 random bits: a run's files are reachable by their path, so another client must not guess it.
        folder = self.outputs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(12)}"
        run = Run(request=request, folder=folder, x0_choice=x0_choice, client=client,
                  recorder=StepRecorder(max_bytes=self.scrub_bytes_per_run))
        with self._lock:
            self._check_client(client)
            self.pending.append(run)
            if session:
                self.active[session] = run
        self.worker.submit(lambda: self._work(run, session))
        return run

    def warm_up(self) -> Future | None:
        """On a CPU, queue on the worker a 2-step run of the default model at its recommended settings, so the
        first visitor does not wait for the model to load and its UNet to be traced (~1.5 s for the embedded
        model). Writes nothing; a failure is logged and the first real run reports it. None on a GPU, where
        models load on first use as before (on ZeroGPU, CUDA is only there inside a request)."""
        if self.loader.device.type != "cpu":
            return None
        def job():
            t = time.perf_counter()
            try:
                request = build_request(prompt="warm-up", model=self.default_model, loader=self.loader,
                                        num_inference_steps=2, seed=0, limits=self.limits)
                generate_here(self.worker, request, loader=self.loader)
            except Exception as e:  # the first run meets the same error and shows it to its user
                log.warning("warm-up of %s failed: %s", self.default_model, e)
                return
            log.info("warmed up %s in %.1f s", self.default_model, time.perf_counter() - t)

        return self.worker.submit(job)

    def _check_client(self, client: str | None) -> None:
        """Refuse (ValueError) a client at its limit of runs and experiments waiting or running. Hold the lock."""
        if client is None or self.max_runs_per_client is None:
            return
        mine = sum(1 for r in self.pending if r.client == client) + self.experiments.get(client, 0)
        if mine >= self.max_runs_per_client:
            raise ValueError(
                f"You already have {mine} run{'s' if mine != 1 else ''} or experiment{'s' if mine != 1 else ''} waiting "
                f"or running, the most one client may have at once here; wait for one to finish or press Stop (the "
                f"server's PLAYGROUND_MAX_RUNS_PER_CLIENT sets the limit).")

    @contextlib.contextmanager
    def admit(self, client: str | None) -> Iterator[None]:
        """Count an Explain-lab experiment against its client's limit while it lasts (ValueError at the limit)."""
        with self._lock:
            self._check_client(client)
            if client is not None:
                self.experiments[client] = self.experiments.get(client, 0) + 1
        try:
            yield
        finally:
            if client is not None:
                with self._lock:
                    self.experiments[client] -= 1
                    if not self.experiments[client]:
                        del self.experiments[client]

    def ahead_of(self, run: Run) -> int:
        """How many runs the worker does before `run` starts (0 once it runs)."""
        with self._lock:
            return self.pending.index(run) if run in self.pending else 0

    def _work(self, run: Run, session: str | None) -> None:
        """The job on the worker thread: load, pick previews, generate, write the files."""
        run.thread = threading.current_thread()
        try:
            if run.latest.is_cancelled():
                raise ValueError("Stopped before the run started.")
            load_here(self.worker, run.request, loader=self.loader)
            profile = self.loader.profile(run.request.model)
            run.previewer = self.loader.previewer(run.request.model)
            side = profile.native_size
            pixels = (run.request.width or side) * (run.request.height or side)
            run.latents_kind, run.x0_kind, run.live_x0_kind = profile.previews.view_kinds(run.x0_choice, pixels)
            # Numbers and step tensors (small runs) only: previews render on demand, and a restored run re-renders.
            writer = TraceWriter(run.folder, run.previewer, previews={}, tensors_limit_bytes=STEP_TENSORS_LIMIT)
            # The recorder sees each step before the UI can take it, so live previews come from the scrub cache.
            run.time_limit = TimeLimit(self.limits.max_run_seconds)
            result = generate(run.request, TeeObserver(run.recorder, writer, run.latest, run.time_limit),
                              loader=self.loader)
            writer.finish(result)
            run.result = result
            tops = [guidance_map(s.denoised_cond, s.denoised_uncond).max() for s in run.steps
                    if s.denoised_cond is not None and s.denoised_uncond is not None]
            run.heat_top = float(max(tops, default=0.0))
            self.keep(run)
        except BaseException as e:  # handed to the UI thread, which reports it
            run.error = e
        finally:
            with self._lock:
                if session and self.active.get(session) is run:
                    del self.active[session]
                if run in self.pending:
                    self.pending.remove(run)
            run.finish()
        if run.result is not None:
            self.prune()  # after finish(): the disk scan never delays the image

    def keep(self, run: Run) -> None:
        """Hold a finished run for scrubbing; the oldest go when there are too many or their tensors too big."""
        with self._lock:
            self.runs[run.run_id] = run
            self.runs.move_to_end(run.run_id)
            while len(self.runs) > 1 and (len(self.runs) > MAX_RUNS_IN_MEMORY or sum(
                    r.recorder.nbytes for r in self.runs.values()) > self.scrub_bytes_total):
                self.runs.popitem(last=False)

    def prune(self) -> None:
        """Retention: the oldest finished runs go past Limits.max_runs_kept / max_output_mb, except the runs in
        flight or held in memory (they may still be on someone's screen)."""
        with self._lock:
            keep = [r.folder for r in (*self.pending, *self.runs.values())]
        try:
            removed = prune_outputs(self.outputs_dir, self.limits, keep=keep)
        except OSError as e:  # retention must never fail a run
            log.warning("retention: %s", e)
            return
        if removed:
            log.info("retention removed %d old run(s)", len(removed))

    def restore(self, folder: Path, trace: Trace) -> Run | None:
        """A finished run rebuilt from its folder (after a restart): its step tensors, re-rendered with the model's
        previewer. None when the run kept no tensors (a large run) or its model is not offered here."""
        if trace.request.model not in self.models or not (folder / "steps" / "tensors.safetensors").is_file():
            return None
        try:
            steps = load_step_tensors(folder, trace.steps)
            self.loader.view(trace.request.model, trace.request.scheduler)
        except ValueError:
            return None
        run = Run(request=trace.request, folder=folder, x0_choice="auto")
        run.recorder.steps.extend(steps)
        run.previewer = self.loader.previewer(trace.request.model)
        run.latents_kind, run.x0_kind, run.live_x0_kind = self.loader.profile(trace.request.model).previews.view_kinds(
            "auto", trace.width * trace.height)
        tops = [guidance_map(s.denoised_cond, s.denoised_uncond).max() for s in run.steps if s.denoised_cond is not None]
        run.heat_top = float(max(tops, default=0.0))
        run.done.set()
        self.keep(run)
        return run

    def stop(self, session: str | None) -> Run | None:
        """Cancel the session's run in flight (it stops at the next step boundary); returns it, or None."""
        with self._lock:
            run = self.active.get(session or "")
        if run is not None:
            run.latest.cancel()
        return run

    # -- previews --------------------------------------------------------------------------------------

    def render(self, run: Run, step: int, name: str) -> str | None:
        """One preview of `step` as a PNG path under the run's steps/ folder, written once (atomically) and reused
        by the live view and the scrubber. name: one of PREVIEW_NAMES; None where the step had no unconditional pass.

        Paths, not arrays: Gradio rewrites the cache file of an array in place, and a browser fetching the same
        preview of an earlier run (same seed) then gets a truncated file (Content-Length errors).
        """
        step = run.recorder.nearest_kept(step)  # a bounded recorder may have thinned this step out
        key = (step, name)
        if key not in run.renders:
            rec = run.steps[step]
            p = run.previewer
            assert p is not None
            has_cfg = rec.denoised_cond is not None and rec.denoised_uncond is not None
            if name == "latents":
                image = p.render(run.latents_kind, rec.latents)
            elif name == "channels":
                image = p.render("channels", rec.latents)
            elif name == "x0":
                image = p.render(run.x0_kind, rec.denoised)
            elif name == "x0_live":
                image = p.render(run.live_x0_kind, rec.denoised)
            elif not has_cfg:
                image = None
            elif name == "delta":
                image = heat(guidance_map(rec.denoised_cond, rec.denoised_uncond), run.heat_top)
            elif name in ("x0_cond", "x0_uncond"):
                image = p.render(run.x0_kind, rec.denoised_cond if name == "x0_cond" else rec.denoised_uncond)
            else:
                raise ValueError(f"unknown preview {name!r}; choose one of: {', '.join(PREVIEW_NAMES)}")
            path = None if image is None else str(save_png(run.folder / "steps" / f"{step:03d}_{name}.png", upscale(image)))
            run.renders[key] = path
        return run.renders[key]

    def step_table(self, run: Run) -> list[list[Any]]:
        return [[s.step + 1, round(s.timestep, 2), None if s.sigma is None else round(s.sigma, 4),
                 None if s.guidance_delta_norm is None else round(s.guidance_delta_norm, 3), round(s.effective_scale, 3)]
                for s in run.steps]

    def step_text(self, run: Run, step: int) -> str:
        s = run.steps[step]
        n = len(run.steps)
        parts = [f"**Step {s.step + 1} / {n}**", f"t = {s.timestep:.1f}"]
        if not s.kept:
            shown = run.steps[run.recorder.nearest_kept(step)].step + 1
            parts.insert(1, f"images from step {shown} (to bound memory this long run kept the tensors of one "
                            f"step in {run.recorder.stride})")
        if s.sigma is not None:
            parts.append(f"σ = {s.sigma:.4g}")
        if s.guidance_delta_norm is not None:
            parts.append(f"‖ε_c − ε_u‖ = {s.guidance_delta_norm:.3g}")
        parts.append(f"effective scale {s.effective_scale:.3g}")
        text = " · ".join(parts)
        if s.denoised_cond is None:
            text += "  \n_No unconditional pass at this step (guidance scale ≤ 1 or outside the guidance interval)._"
        return text
