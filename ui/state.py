"""What the views share (no Gradio): the loader and the one generation worker, runs in flight and finished,
and the per-step preview PNGs rendered once and reused by the live view, the scrubber and restores."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import LatestObserver, StepRecorder, TeeObserver, TimeLimit
from pipelines.limits import Limits
from pipelines.outputs import (STEP_TENSORS_LIMIT, Trace, TraceWriter, load_step_tensors, prune_experiments,
                               prune_outputs, remove_run_folder, save_png)
from pipelines.previews import Previewer
from pipelines.profile import fitting_schedulers
from pipelines.requests import OWN_SCHEDULER, build_request, missing_embedded
from pipelines.schedulers import describe_choice
from pipelines.types import GenerationRequest, GenerationResult, StepEvent
from pipelines.worker import GenerationWorker, generate_here, load_here
from ui.clients import Admission, request_address
from ui.mcp import tagged_client
from ui.render import guidance_map, heat, upscale

log = logging.getLogger("playground")

MAX_RUNS_IN_MEMORY = 8  # finished runs kept for scrubbing
# Fair retention: what one client makes cannot evict another client's runs or Explain images younger than this
# (its own oldest go first), and one client keeps at most this many runs / experiments on disk.
PROTECT_SECONDS = 3600.0
RUNS_KEPT_PER_CLIENT = 50
EXPERIMENTS_KEPT_PER_CLIENT = 10
MAX_EXPERIMENTS_KEPT = 50  # experiment folders kept under outputs/explain, app-wide
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
    _finished: Any = None  # the asyncio future `wait` awaits (made on first wait, in the waiting event loop)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait in an event loop until the run is done (True) or `timeout` seconds pass (False), without holding a
        thread. Cancelling the waiting task (a client that cancels or goes away) cancels the run at its next step."""
        if self.done.is_set():
            return True
        if self._finished is None:
            loop = asyncio.get_running_loop()
            finished = self._finished = loop.create_future()
            self._on_done.append(lambda: loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None)))
            if self.done.is_set():
                return True
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), timeout)
            return True
        except asyncio.TimeoutError:
            return False
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
                 max_runs_per_client: int | None = None, limits: Limits | None = None,
                 trusted_proxy_hops: int = 0) -> None:
        """max_runs_per_client: runs and experiments one client may have queued or running at once (None: no
        limit); limits: the work budget every request is built under, the wall-clock limit of a run and what the
        outputs folder keeps (default: Limits(), the built-in defaults); trusted_proxy_hops: how many proxies in
        front of the server append to X-Forwarded-For (ui/clients.py; 0: the header is never trusted)."""
        self.loader = loader
        self.models = models
        self.default_model = default_model
        self.outputs_dir = outputs_dir
        self.preview_interval = preview_interval
        self.worker = worker or GenerationWorker()
        self.scrub_bytes_per_run = scrub_bytes_per_run
        self.admission = Admission(max_runs_per_client)  # per client: events queued or running
        self.trusted_proxy_hops = trusted_proxy_hops
        self.mcp_key = secrets.token_bytes(32)  # signs the MCP caller's address on Gradio's loopback call (ui/mcp.py)
        self.limits = limits or Limits()
        self.pending: list[Run] = []  # queued or running, in the worker's order
        self.scrub_bytes_total = scrub_bytes_total
        self.runs: OrderedDict[str, Run] = OrderedDict()  # finished runs kept for scrubbing
        self.active: dict[str, Run] = {}  # session hash -> run in flight (for Stop)
        # Who made which run / experiment folder and when (this process's only; older folders belong to no one).
        self.run_owners: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self.experiment_owners: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._lock = threading.Lock()

    # -- choices ---------------------------------------------------------------------------------------

    def scheduler_choices(self, model: str) -> list[tuple[str, str]]:
        """(label, key) for the schedulers that fit `model`, each saying whether it is stochastic and what a step costs."""
        pipe = self.loader.loaded(model)
        keys = fitting_schedulers(model, pipe)  # the profile's rule, read before the model loads where it can be
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
        """Queue the run on the generation worker; its LatestObserver receives the steps. The caller holds the
        client's admission (Admission.hold) for as long as it waits on the run."""
        # 96 random bits: a run's files are reachable by their path, so another client must not guess it.
        folder = self.outputs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(12)}"
        run = Run(request=request, folder=folder, x0_choice=x0_choice, client=client,
                  recorder=StepRecorder(max_bytes=self.scrub_bytes_per_run))
        with self._lock:
            self.pending.append(run)
            self._own(self.run_owners, run.run_id, client)
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

    def client_of(self, http: Any) -> str | None:
        """The address of the client behind a gr.Request, for the per-client limit (ui/clients.py); for an MCP tool
        call, the MCP caller's (ui/mcp.py), not that of Gradio's loopback call."""
        return tagged_client(http, self.mcp_key) or request_address(http, self.trusted_proxy_hops)

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
            self.prune(run.client)  # after finish(): the disk scan never delays the image

    def keep(self, run: Run) -> None:
        """Hold a finished run for scrubbing; the oldest go when there are too many or their tensors too big."""
        with self._lock:
            self.runs[run.run_id] = run
            self.runs.move_to_end(run.run_id)
            while len(self.runs) > 1 and (len(self.runs) > MAX_RUNS_IN_MEMORY or sum(
                    r.recorder.nbytes for r in self.runs.values()) > self.scrub_bytes_total):
                self.runs.popitem(last=False)

    def _own(self, owners: OrderedDict, name: str, client: str | None) -> None:
        """Record that `client` made the folder `name` now (hold the lock); the record is bounded like the folders."""
        owners[name] = (client, time.time())
        while len(owners) > 4 * max(self.limits.max_runs_kept, MAX_EXPERIMENTS_KEPT):
            owners.popitem(last=False)

    def _others(self, owners: OrderedDict, actor: str | None) -> tuple[list[str], list[str]]:
        """(folders of other clients made within PROTECT_SECONDS, the actor's own folders oldest first)."""
        now = time.time()
        with self._lock:
            items = list(owners.items())
        protected = [name for name, (client, t) in items if client != actor and now - t < PROTECT_SECONDS]
        mine = [name for name, (client, _) in items if client == actor and actor is not None]
        return protected, mine

    def prune(self, actor: str | None = None) -> None:
        """Retention after a run of `actor`: the oldest finished runs go past Limits.max_runs_kept / max_output_mb,
        except the runs in flight or held in memory (they may still be on someone's screen) and other clients' runs
        made within PROTECT_SECONDS; the actor keeps at most RUNS_KEPT_PER_CLIENT, its oldest going first."""
        with self._lock:
            keep = [r.folder.name for r in (*self.pending, *self.runs.values())]
        protected, mine = self._others(self.run_owners, actor)
        try:
            removed = prune_outputs(self.outputs_dir, self.limits, keep=keep + protected)
            gone = {p.name for p in removed}
            own = [name for name in mine if name not in gone and name not in keep]
            for name in own[:max(0, len(own) - RUNS_KEPT_PER_CLIENT)]:
                if remove_run_folder(self.outputs_dir / name):
                    removed.append(self.outputs_dir / name)
        except OSError as e:  # retention must never fail a run
            log.warning("retention: %s", e)
            return
        with self._lock:
            for path in removed:
                self.run_owners.pop(path.name, None)
        if removed:
            log.info("retention removed %d old run(s)", len(removed))

    def experiment_folder(self, client: str | None) -> Path:
        """A new folder under outputs/explain for one experiment of `client` (96 random bits: other visitors must
        not guess it), after fair retention: at most MAX_EXPERIMENTS_KEPT folders app-wide, other clients' made
        within PROTECT_SECONDS kept, at most EXPERIMENTS_KEPT_PER_CLIENT of the client's own (oldest first)."""
        root = self.outputs_dir / "explain"
        protected, mine = self._others(self.experiment_owners, client)
        removed = prune_experiments(root, MAX_EXPERIMENTS_KEPT - 1, keep=protected)
        gone = {p.name for p in removed}
        own = [name for name in mine if name not in gone]
        extra = own[:max(0, len(own) - (EXPERIMENTS_KEPT_PER_CLIENT - 1))]
        if extra:
            removed += prune_experiments(root, 0, only=extra)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(12)}"
        with self._lock:
            for path in removed:
                self.experiment_owners.pop(path.name, None)
            self._own(self.experiment_owners, name, client)
        return root / name

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
