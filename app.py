"""The playground UI (top floor): widgets -> GenerationRequest -> pipelines.generate.generate() -> previews.

Gradio is a shell here: every image is made by generate(), observed by a LatestObserver that keeps only
the newest step for the browser. `build_demo(...)` takes its dependencies (loader, models, output folder)
so tests can start it around tiny real pipelines; `python app.py` launches it on GRADIO_SERVER_NAME/PORT.
"""

from __future__ import annotations

try:  # Hugging Face Spaces (ZeroGPU): import before torch touches CUDA; a no-op decorator elsewhere.
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn

import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch

from guidance.registry import METHODS
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import LatestObserver, Observer, TeeObserver
from pipelines.outputs import TraceWriter, save_png
from pipelines.previews import Previewer
from pipelines.registry import MODELS, extra_models_from_env, recommended_settings, resolve
from pipelines.schedulers import SCHEDULERS, compatible_keys
from pipelines.types import DEFAULT_MODEL, GenerationRequest, GenerationResult, StepEvent

log = logging.getLogger("playground")

ROOT = Path(__file__).resolve().parent
OWN_SCHEDULER = "model default"  # dropdown value meaning "keep the model's own scheduler" (request.scheduler=None)
PREVIEW_SIDE = 256  # live and scrub previews are upscaled (nearest neighbour) to at least this many pixels
DECODE_LIMIT = {"cpu": 256 * 256, "cuda": 1024 * 1024}  # "auto" x̂0 preview: VAE decode up to this many pixels
# After a live preview took r seconds, the next waits >= RENDER_SHARE·r: previews, which compete with the
# denoising loop for the CPU, stay under ~1/13 of the run.
RENDER_SHARE = 12
MAX_RUNS_IN_MEMORY = 8  # finished runs kept for scrubbing
HISTORY_LIMIT = 60  # runs shown in the history gallery
# The embedded model knows only its world's words (training/world.py): 5 shapes, 8 colours, small/large, a 3x3 grid
# (it was trained on named backgrounds too but ignores them: the seed picks the background).
EXAMPLE_PROMPTS = [
    ["a large red circle in the center"],
    ["a small blue star in the top left"],
    ["a yellow heart at the bottom"],
    ["a large green triangle on the right"],
    ["a small purple square above an orange circle"],
]
STOP_WAIT = 10.0  # seconds Stop waits for the run to reach a step boundary before it reports back
STEP_COLUMNS = ["step", "timestep", "σ", "‖ε_c − ε_u‖", "effective scale"]  # the per-step table

CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
#final-image img { width: 100%; height: 100%; object-fit: contain; }
#live-status { min-height: 2.2em; }
.step-note { font-size: 0.9em; opacity: 0.85; }
footer { display: none !important; }
"""


# ---------------------------------------------------------------------------------------------------------
# Small pure helpers (no Gradio): arrays for the browser, the stock-diffusers script, the history on disk.


def upscale(image: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Nearest-neighbour upscale by an integer factor so the shorter side reaches `side` (tiny latents stay crisp)."""
    factor = max(1, side // max(1, min(image.shape[:2])))
    return image.repeat(factor, 0).repeat(factor, 1) if factor > 1 else image


def heat(diff: np.ndarray, top: float) -> np.ndarray:
    """A (h, w) map of non-negative values -> (h, w, 3) uint8, black -> red -> yellow -> white, `top` at white."""
    x = np.clip(diff / top if top > 0 else np.zeros_like(diff), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def guidance_map(cond: torch.Tensor, uncond: torch.Tensor) -> np.ndarray:
    """|x̂0_cond − x̂0_uncond| of the first image, averaged over latent channels: (1, C, h, w) -> (h, w)."""
    return (cond[0].float() - uncond[0].float()).abs().mean(0).numpy()


def display_source(model: str) -> str:
    """What from_pretrained should be given to reproduce `model`: the hub id, or the folder relative to the repo."""
    source = resolve(model)
    try:
        return str(Path(source).resolve().relative_to(ROOT))
    except ValueError:
        return source


def diffusers_code(result: GenerationResult, dtype: torch.dtype, device: str) -> str:
    """A short stock-diffusers script that reproduces `result` (plain CFG and CFG rescale exactly)."""
    return diffusers_script(result.request, seed=result.seed, width=result.width, height=result.height,
                            scheduler=result.scheduler, family=result.family,
                            stopped_at=result.steps_completed if result.cancelled else None, dtype=dtype, device=device)


def diffusers_script(req: GenerationRequest, *, seed: int, width: int, height: int, scheduler: str, family: str,
                     stopped_at: int | None, dtype: torch.dtype, device: str) -> str:
    """diffusers_code() from a run's resolved settings, as a result or its trace.json records them."""
    lines = ["import torch", "from diffusers import DiffusionPipeline"]
    spec = SCHEDULERS.get(scheduler) if req.scheduler is not None else None
    if spec is not None:
        lines[-1] += f", {spec.cls.__name__}"
    dtype_arg = "" if dtype == torch.float32 else f", dtype=torch.{str(dtype).removeprefix('torch.')}"
    lines += ["", f"pipe = DiffusionPipeline.from_pretrained({display_source(req.model)!r}{dtype_arg}).to({device!r})"]
    if spec is not None:
        overrides = "".join(f", {k}={v!r}" for k, v in spec.overrides.items())
        lines.append(f"pipe.scheduler = {spec.cls.__name__}.from_config(pipe.scheduler.config{overrides})")
    args = [f"prompt={req.prompt!r}"]
    if req.negative_prompt:
        args.append(f"negative_prompt={req.negative_prompt!r}")
    args += [
        f"num_inference_steps={req.num_inference_steps}",
        f"guidance_scale={req.guidance_scale:g}",
        f"width={width}",
        f"height={height}",
        f'generator=torch.Generator("cpu").manual_seed({seed})',
    ]
    note = None
    if req.guidance == "rescale":
        phi = req.guidance_params.get("guidance_rescale", METHODS["rescale"].params[0].default)
        args.append(f"guidance_rescale={phi:g}")
    elif req.guidance != "cfg":
        note = f"# Stock __call__ has no '{req.guidance}' guidance: same settings with plain CFG (a different image)."
    if family == "pixart_sigma":
        args.append("use_resolution_binning=False")
    if stopped_at is not None:
        stopped = f"# The playground run was stopped at step {stopped_at}; this one runs to the end."
        note = f"{note}\n{stopped}" if note else stopped
    call = "image = pipe(\n" + "".join(f"    {a},\n" for a in args) + ").images[0]"
    return "\n".join(lines + ([note] if note else []) + [call, 'image.save("image.png")']) + "\n"


def history(outputs_dir: Path, limit: int = HISTORY_LIMIT) -> list[tuple[str, str]]:
    """Past runs on disk, newest first, as (run folder, caption); a run counts once trace.json is written."""
    runs = []
    for trace in outputs_dir.glob("*/trace.json"):
        try:
            runs.append((trace.stat().st_mtime, trace.parent))
        except OSError:
            continue
    items = []
    for _, folder in sorted(runs, reverse=True)[:limit]:
        try:
            request = json.loads((folder / "trace.json").read_text())["request"]
        except (OSError, ValueError, KeyError):
            continue
        if (folder / "image.png").is_file():
            prompt = request.get("prompt") or "(no prompt)"
            items.append((str(folder), f"{prompt[:40]} · seed {request.get('seed')}"))
    return items


# ---------------------------------------------------------------------------------------------------------
# One run: the worker thread that calls generate(), and what it keeps for the scrubber.


@dataclass(frozen=True)
class StepRecord:
    """One step kept for scrubbing: first image only, on the CPU. Latents are (1, C, h, w)."""

    step: int  # 0-based loop index
    timestep: float  # scheduler timestep t
    sigma: float | None  # σ at this step
    latents: torch.Tensor  # x_{t-1} after the step
    denoised: torch.Tensor  # x̂0 of the guided prediction
    denoised_cond: torch.Tensor | None  # x̂0 of the conditional prediction (None without CFG)
    denoised_uncond: torch.Tensor | None  # x̂0 of the unconditional prediction (None without CFG)
    guidance_delta_norm: float | None  # ‖ε_c − ε_u‖
    effective_scale: float  # guidance scale applied at this step


class StepRecorder(Observer):
    """Keeps every step's tensors (first image, CPU) so the scrubber can render any step after the run."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []

    def on_step(self, event: StepEvent) -> None:
        def cpu(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[:1].to("cpu")

        self.steps.append(StepRecord(
            step=event.step, timestep=event.timestep, sigma=event.sigma, latents=cpu(event.latents),
            denoised=cpu(event.denoised), denoised_cond=cpu(event.denoised_cond),
            denoised_uncond=cpu(event.denoised_uncond), guidance_delta_norm=event.guidance_delta_norm,
            effective_scale=event.effective_scale,
        ))


@dataclass
class Run:
    """A run in flight or finished: its folder, observers, and the outcome the worker leaves behind."""

    request: GenerationRequest
    folder: Path
    x0_choice: str  # "auto", "decode" or "rgb" as the user chose
    latest: LatestObserver = field(default_factory=LatestObserver)
    recorder: StepRecorder = field(default_factory=StepRecorder)
    done: threading.Event = field(default_factory=threading.Event)
    previewer: Previewer | None = None  # set by the worker once the model is loaded
    latents_kind: str = "channels"  # preview of x_t: "rgb" where the model has a latent→RGB map
    x0_kind: str = "channels"  # preview of x̂0: "decode" or "rgb" (or "channels" without an RGB map)
    live_x0_kind: str = "channels"  # x̂0 preview while the run is going (the cheap map on CPU under "auto")
    result: GenerationResult | None = None
    error: BaseException | None = None
    renders: dict[tuple[int, str], str | None] = field(default_factory=dict)  # preview PNG paths by (step, name)
    heat_top: float = 0.0  # largest |x̂0_cond − x̂0_uncond| over the run, so heat maps compare across steps

    @property
    def run_id(self) -> str:
        return self.folder.name


def pick_x0_kind(choice: str, previewer: Previewer, pixels: int, device: torch.device, offload: bool = False) -> str:
    """The x̂0 preview for a run: VAE decode for small images (or when asked), else latent→RGB.

    With model CPU offload, never decode: accelerate's hooks would move the VAE onto the GPU (and the UNet
    off it) from the UI thread while the loop is inside the UNet.
    """
    if offload:
        choice = "rgb"
    if choice == "auto":
        choice = "decode" if pixels <= DECODE_LIMIT.get(device.type, DECODE_LIMIT["cpu"]) else "rgb"
    if choice not in previewer.kinds:
        return "channels"
    return choice


# ---------------------------------------------------------------------------------------------------------
# The app: state shared by all sessions, event handlers, layout.


class Playground:
    """Handlers and shared state behind the Gradio page; one instance per build_demo()."""

    def __init__(self, loader: ModelLoader, models: list[str], default_model: str, outputs_dir: Path,
                 preview_interval: float) -> None:
        self.loader = loader
        self.models = models
        self.default_model = default_model
        self.outputs_dir = outputs_dir
        self.preview_interval = preview_interval
        self.runs: OrderedDict[str, Run] = OrderedDict()  # finished runs kept for scrubbing
        self.active: dict[str, Run] = {}  # session hash -> run in flight (for Stop)
        self._lock = threading.Lock()

    # -- choices ---------------------------------------------------------------------------------------

    def scheduler_choices(self, model: str) -> list[str]:
        """Scheduler keys that fit `model`: from the loaded scheduler, else from the registry family's kind."""
        pipe = self.loader.loaded(model)
        if pipe is not None:
            keys = compatible_keys(pipe.scheduler)
        elif model in MODELS:
            kind = "flow" if MODELS[model].family == "sd3" else "discrete"
            keys = [k for k, s in SCHEDULERS.items() if s.kind == kind]
        else:
            keys = list(SCHEDULERS)
        return [OWN_SCHEDULER, *keys]

    def model_note(self, model: str) -> str:
        entry = MODELS.get(model)
        text = f"`{display_source(model)}`" + (f" — {entry.note}" if entry else "")
        missing = self.missing_embedded(model)
        return f"⚠️ {missing}" if missing else text

    def missing_embedded(self, model: str) -> str | None:
        """A message when the embedded model is chosen but its folder is not there (yet)."""
        if model == DEFAULT_MODEL and self.loader.loaded(model) is None and not Path(resolve(model)).is_dir():
            others = [m for m in self.models if m != DEFAULT_MODEL]
            hint = f" or pick another model ({', '.join(others)})" if others else ""
            return (f"The embedded model '{DEFAULT_MODEL}' is not installed: {display_source(model)} is missing. "
                    f"Train and export it (training/){hint}.")
        return None

    # -- request ---------------------------------------------------------------------------------------

    def recommended(self, model: str) -> dict[str, float | int]:
        """Steps and guidance scale for `model`: the registry's, else its stock pipeline's (loads the model)."""
        entry = MODELS.get(model)
        if entry is not None:
            return {"num_inference_steps": entry.steps, "guidance_scale": entry.guidance_scale}
        return recommended_settings(model, self.loader.get(model))

    def make_request(self, *, prompt: str, negative_prompt: str, model: str, scheduler: str | None,
                     num_inference_steps: float | None, guidance_scale: float | None, seed: int | None,
                     width: float | None, height: float | None, guidance: str,
                     guidance_params: dict[str, float]) -> GenerationRequest:
        """Widget values -> a validated request; any ValueError becomes a gr.Error naming what is allowed.
        num_inference_steps / guidance_scale None take the model's recommended values."""
        try:
            if model not in self.models:
                raise ValueError(f"model {model!r} is not offered here; choose one of: {', '.join(self.models)}")
            missing = self.missing_embedded(model)
            if missing:
                raise ValueError(missing)
            if num_inference_steps is None or guidance_scale is None:
                recommended = self.recommended(model)
                if num_inference_steps is None:
                    num_inference_steps = recommended["num_inference_steps"]
                if guidance_scale is None:
                    guidance_scale = recommended["guidance_scale"]
            return GenerationRequest(
                prompt=prompt or "",
                negative_prompt=negative_prompt or "",
                model=model,
                scheduler=None if scheduler in (None, "", OWN_SCHEDULER) else scheduler,
                num_inference_steps=_whole("num_inference_steps", num_inference_steps),
                guidance_scale=guidance_scale,
                seed=seed,
                width=_whole("width", width) or None,
                height=_whole("height", height) or None,
                guidance=guidance or "cfg",
                guidance_params=guidance_params,
            )
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None

    # -- running ---------------------------------------------------------------------------------------

    def start(self, request: GenerationRequest, x0_choice: str, session: str | None) -> Run:
        """Start generate() in a worker thread; the run's LatestObserver receives its steps."""
        folder = self.outputs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        run = Run(request=request, folder=folder, x0_choice=x0_choice)
        if session:
            with self._lock:
                self.active[session] = run
        threading.Thread(target=self._work, args=(run, session), daemon=True, name=f"generate-{run.run_id}").start()
        return run

    def _work(self, run: Run, session: str | None) -> None:
        try:
            pipe, _ = self.loader.view(run.request.model, run.request.scheduler)
            run.previewer = Previewer(pipe)
            run.latents_kind = "rgb" if "rgb" in run.previewer.kinds else "channels"
            side = run.previewer.family.default_size(pipe)
            pixels = (run.request.width or side) * (run.request.height or side)
            run.x0_kind = pick_x0_kind(run.x0_choice, run.previewer, pixels, self.loader.device,
                                       offload=self.loader.offload and self.loader.device.type == "cuda")
            # On a CPU a VAE decode costs more than a denoising step of a small model and competes with the
            # loop for the cores: under "auto" the live view uses the latent→RGB map, the scrubber decodes.
            cheap_live = run.x0_choice == "auto" and self.loader.device.type == "cpu" and "rgb" in run.previewer.kinds
            run.live_x0_kind = "rgb" if cheap_live else run.x0_kind
            writer = TraceWriter(run.folder, run.previewer, previews={})  # numbers only; scrub renders from memory
            # The recorder sees each step before the UI can take it, so live previews come from (and fill) the scrub cache.
            result = generate(run.request, TeeObserver(run.recorder, writer, run.latest), loader=self.loader)
            writer.finish(result)
            run.result = result
            tops = [guidance_map(s.denoised_cond, s.denoised_uncond).max() for s in run.recorder.steps
                    if s.denoised_cond is not None]
            run.heat_top = float(max(tops, default=0.0))
            with self._lock:
                self.runs[run.run_id] = run
                while len(self.runs) > MAX_RUNS_IN_MEMORY:
                    self.runs.popitem(last=False)
        except BaseException as e:  # handed to the UI thread, which reports it
            run.error = e
        finally:
            if session:
                with self._lock:
                    if self.active.get(session) is run:
                        del self.active[session]
            run.done.set()
            run.latest.wake()

    def wait(self, run: Run) -> GenerationResult:
        """Block until the worker is done; its errors become gr.Error (ValueError: the message as is)."""
        run.done.wait()
        if run.error is not None:
            raise as_gr_error(run.error) from None
        assert run.result is not None
        return run.result

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
        by the live view and the scrubber. name: "latents" (x_t), "channels", "x0", "x0_live", "x0_cond", "x0_uncond" or
        "delta" (guidance heat map); None where the step had no unconditional pass.

        Paths, not arrays: Gradio rewrites the cache file of an array in place, and a browser fetching the same
        preview of an earlier run (same seed) then gets a truncated file (Content-Length errors).
        """
        key = (step, name)
        if key not in run.renders:
            rec = run.recorder.steps[step]
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
            else:
                image = p.render(run.x0_kind, rec.denoised_cond if name == "x0_cond" else rec.denoised_uncond)
            path = None if image is None else str(save_png(run.folder / "steps" / f"{step:03d}_{name}.png", upscale(image)))
            run.renders[key] = path
        return run.renders[key]

    def step_table(self, run: Run) -> list[list[Any]]:
        return [[s.step + 1, round(s.timestep, 2), None if s.sigma is None else round(s.sigma, 4),
                 None if s.guidance_delta_norm is None else round(s.guidance_delta_norm, 3), round(s.effective_scale, 3)]
                for s in run.recorder.steps]

    def step_text(self, run: Run, step: int) -> str:
        s = run.recorder.steps[step]
        n = len(run.recorder.steps)
        parts = [f"**Step {s.step + 1} / {n}**", f"t = {s.timestep:.1f}"]
        if s.sigma is not None:
            parts.append(f"σ = {s.sigma:.4g}")
        if s.guidance_delta_norm is not None:
            parts.append(f"‖ε_c − ε_u‖ = {s.guidance_delta_norm:.3g}")
        parts.append(f"effective scale {s.effective_scale:.3g}")
        text = " · ".join(parts)
        if s.denoised_cond is None:
            text += "  \n_No unconditional pass at this step (guidance scale ≤ 1 or outside the guidance interval)._"
        return text


def _whole(name: str, value: float | None) -> int | None:
    """A widget number that must be a whole number (sliders and gr.Number send floats)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def as_gr_error(error: BaseException) -> gr.Error:
    """ValueErrors (bad input) are shown as they are; anything else is logged and shown with its type."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, ValueError):
        return gr.Error(str(error), print_exception=False)
    log.error("generation failed", exc_info=error)
    return gr.Error(f"Generation failed with {type(error).__name__}: {error}", print_exception=False)


class _Blocks(gr.Blocks):
    """gr.Blocks whose launch() brings the playground's CSS and serves the outputs folder."""

    outputs_dir: Path

    def launch(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("css", CSS)
        kwargs.setdefault("theme", gr.themes.Soft())
        kwargs["allowed_paths"] = [*(kwargs.get("allowed_paths") or []), str(self.outputs_dir)]
        return super().launch(*args, **kwargs)


def preview_image(label: str, height: int, **kw: Any) -> gr.Image:
    """A read-only, pixel-crisp preview image (live view and scrubber)."""
    return gr.Image(label=label, elem_classes="pixelated", format="png", height=height, interactive=False,
                    buttons=[], **kw)


def default_loader(models: list[str]) -> ModelLoader:
    """CUDA (fp16, or PLAYGROUND_DTYPE=bf16/fp32) when there is one, else CPU fp32; PLAYGROUND_CPU_OFFLOAD=1 offloads."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    name = os.environ.get("PLAYGROUND_DTYPE")
    if name is not None and name not in dtypes:
        raise ValueError(f"PLAYGROUND_DTYPE must be one of: {', '.join(dtypes)}; got {name!r}")
    return ModelLoader(dtype=dtypes[name] if name else None, allowed=models,
                       offload=os.environ.get("PLAYGROUND_CPU_OFFLOAD") == "1")


def build_demo(
    loader: ModelLoader | None = None,
    models: list[str] | None = None,
    outputs_dir: str | os.PathLike = ROOT / "outputs",
    default_model: str | None = None,
    preview_interval: float = 0.25,
) -> gr.Blocks:
    """The playground page. `models` is the allow-list (default: the embedded model, the curated hub list and
    PLAYGROUND_EXTRA_MODELS); `default_model` the initial choice (default: PLAYGROUND_DEFAULT_MODEL or the
    first model); `preview_interval` the shortest time between two live previews, in seconds."""
    if models is None:
        models = list(dict.fromkeys([DEFAULT_MODEL, *MODELS, *extra_models_from_env()]))
    default_model = default_model or os.environ.get("PLAYGROUND_DEFAULT_MODEL") or models[0]
    if default_model not in models:
        raise ValueError(f"default model {default_model!r} is not offered; choose one of: {', '.join(models)}")
    loader = loader or default_loader(models)
    outputs_dir = Path(outputs_dir)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    app = Playground(loader, models, default_model, outputs_dir, preview_interval)
    entry = MODELS.get(default_model)

    with _Blocks(title="Diffusion playground") as demo:
        demo.outputs_dir = outputs_dir
        gr.Markdown("## Diffusion playground\nType a prompt, pick a model, scheduler and guidance, and watch the "
                    "image form: the noisy latents x_t and the model's guess of the clean image x̂0 at every step.")
        run_id = gr.State("")
        history_folders = gr.State([])

        with gr.Row(equal_height=False):
            # ---------------- controls ----------------
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a small yellow star in the top left")
                negative_prompt = gr.Textbox("", label="Negative prompt", lines=1, placeholder="(none)")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", scale=3)
                    stop_btn = gr.Button("Stop", variant="stop", scale=1)
                gr.Examples(EXAMPLE_PROMPTS, inputs=[prompt], label="Prompts in the embedded model's world",
                            cache_examples=False, examples_per_page=len(EXAMPLE_PROMPTS))
                model = gr.Dropdown(models, value=default_model, label="Model")
                model_note = gr.Markdown(app.model_note(default_model), elem_classes="step-note")
                scheduler = gr.Dropdown(app.scheduler_choices(default_model), value=OWN_SCHEDULER, label="Scheduler")
                num_inference_steps = gr.Slider(1, 500, value=entry.steps if entry else 20, step=1, label="Steps")
                with gr.Row():
                    guidance = gr.Dropdown([(k, k) for k in METHODS], value="cfg", label="Guidance method", scale=1)
                    guidance_scale = gr.Slider(0.0, 20.0, value=entry.guidance_scale if entry else 7.5, step=0.1,
                                               label="Guidance scale", scale=2)
                with gr.Accordion("Guidance method parameters", open=False):
                    method_note = gr.Markdown(_method_note("cfg"), elem_classes="step-note")
                    param_groups: dict[str, gr.Group] = {}
                    param_sliders: dict[str, gr.Slider] = {}  # "method__param" -> slider
                    for key, spec in METHODS.items():
                        with gr.Group(visible=key == "cfg") as group:
                            for p in spec.params:
                                step = 1 if p.integer else 0.01  # fine enough for every default (e.g. σ 0.28)
                                param_sliders[f"{key}__{p.name}"] = gr.Slider(
                                    p.low, p.high, value=p.default, step=step, label=p.name, info=p.doc)
                        param_groups[key] = group
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", scale=2, min_width=120)
                    randomize_seed = gr.Checkbox(value=True, label="Random seed", scale=1, min_width=110)
                with gr.Row():
                    width = gr.Slider(0, 2048, value=0, step=8, label="Width", info="0 = the model's size")
                    height = gr.Slider(0, 2048, value=0, step=8, label="Height", info="0 = the model's size")
                x0_preview = gr.Radio([("Auto", "auto"), ("VAE decode", "decode"), ("Latent→RGB (fast)", "rgb")],
                                      value="auto", label="x̂0 preview",
                                      info="Auto: on a CPU the live view uses the cheap linear latent→RGB map and the "
                                           "scrubber decodes with the VAE; on a GPU small images decode live too.")

            # ---------------- live view, result, scrubber ----------------
            with gr.Column(scale=5):
                status = gr.Markdown("Ready.", elem_id="live-status")
                with gr.Row():
                    live_latents = preview_image("Latents x_t", 230, elem_id="live-latents")
                    live_channels = preview_image("Latent channels", 230, elem_id="live-channels")
                    live_x0 = preview_image("Predicted x̂0", 230, elem_id="live-x0")
                    final_image = gr.Image(label="Final image", elem_id="final-image", elem_classes="pixelated",
                                           type="filepath", format="png", height=230, interactive=False,
                                           buttons=["download", "fullscreen"])
                with gr.Group(visible=False) as scrub_group:
                    scrub = gr.Slider(1, 2, value=1, step=1, label="Scrub through the steps", elem_id="scrub")
                    step_info = gr.Markdown(elem_id="step-info")
                    with gr.Row():
                        scrub_latents = preview_image("x_t", 170, elem_id="scrub-latents")
                        scrub_x0 = preview_image("x̂0 (guided)", 170, elem_id="scrub-x0")
                        scrub_cond = preview_image("x̂0 conditional", 170)
                        scrub_uncond = preview_image("x̂0 unconditional", 170)
                        scrub_delta = preview_image("|x̂0 cond − uncond|", 170)
                    gr.Markdown(
                        "**Why many small steps?** Early on, x̂0 is the model's best guess from almost pure noise: "
                        "a blurry *average* of every image that fits the prompt. Jumping straight to it gives that "
                        "blur. Each small step commits to a little detail, re-noises less, and asks again — so the "
                        "guess sharpens. Scrub from step 1 to the end and watch x̂0 go from average to specific. "
                        "The heat map shows where the prompt pushes hardest (brighter = larger cond − uncond "
                        "difference, on one scale for the whole run).", elem_classes="step-note")
                    with gr.Accordion("Per-step numbers", open=False):
                        with gr.Row():
                            sigma_plot = gr.LinePlot(x="step", y="sigma", y_title="σ", label="Noise level σ per step",
                                                     height=200)
                            delta_plot = gr.LinePlot(x="step", y="delta", y_title="‖ε_c − ε_u‖", height=200,
                                                     label="Guidance difference ‖ε_c − ε_u‖ per step")
                        steps_table = gr.Dataframe(headers=STEP_COLUMNS, elem_id="steps-table",
                                                   interactive=False, wrap=True, max_height=260)
                with gr.Accordion("diffusers code that reproduces this image", open=False):
                    code = gr.Code(language="python", interactive=False, label="diffusers", elem_id="diffusers-code")

        gr.Markdown("### History")
        gallery = gr.Gallery(label="Past runs (click one to restore its settings)", columns=10, height=200,
                             fit_columns=False, object_fit="contain", allow_preview=False, elem_id="history",
                             elem_classes="pixelated")

        # API-only inputs (hidden): plain names and defaults so `client.predict(prompt=..., api_name="/generate")` works.
        with gr.Group(visible=False):
            api_inputs = dict(
                prompt=gr.Textbox(label="prompt"),
                negative_prompt=gr.Textbox("", label="negative_prompt"),
                model=gr.Textbox(default_model, label="model"),
                scheduler=gr.Textbox("", label="scheduler"),
                num_inference_steps=gr.Number(-1, precision=0, label="num_inference_steps"),
                guidance_scale=gr.Number(-1, label="guidance_scale"),
                seed=gr.Number(-1, precision=0, label="seed"),
                width=gr.Number(0, precision=0, label="width"),
                height=gr.Number(0, precision=0, label="height"),
                guidance=gr.Textbox("cfg", label="guidance"),
                guidance_params=gr.Textbox("{}", label="guidance_params"),
            )
            api_image = gr.Image(type="filepath", format="png", label="image")
            api_seed = gr.Number(precision=0, label="seed")
            api_info = gr.JSON(label="info")
            api_button = gr.Button()

        # ---------------- handlers ----------------
        control_inputs = dict(prompt=prompt, negative_prompt=negative_prompt, model=model, scheduler=scheduler,
                              num_inference_steps=num_inference_steps, guidance=guidance, guidance_scale=guidance_scale,
                              seed=seed, randomize_seed=randomize_seed, width=width, height=height,
                              x0_preview=x0_preview, **param_sliders)
        run_outputs = [status, live_latents, live_channels, live_x0, final_image, seed, scrub_group, scrub, step_info,
                       scrub_latents, scrub_x0, scrub_cond, scrub_uncond, scrub_delta, steps_table, sigma_plot,
                       delta_plot, code, gallery, history_folders, run_id]

        def finished(run: Run, result: GenerationResult) -> dict:
            """Outputs once the image exists: final image, status, last step's previews, table, code, history."""
            t = result.timings
            rate = result.steps_completed / t.denoise if t.denoise > 0 else 0.0
            what = f"Stopped at step {result.steps_completed} of {result.num_steps}" if result.cancelled else \
                f"Done: {result.steps_completed} steps"
            out = {
                status: f"{what} in {t.denoise:.2f} s ({rate:.1f} it/s), {result.width}×{result.height}, "
                        f"{result.scheduler}, seed {result.seed}. Saved to `{run.folder.name}/`.",
                final_image: str(run.folder / "image.png"),
                seed: result.seed,
                code: diffusers_code(result, run.previewer.pipe.dtype, app.loader.device.type),
                run_id: run.run_id,
            } | history_outputs()
            return out

        def scrubber(run: Run) -> dict:
            """The scrubber, opened at the last step (the slider's own change event is not needed for that)."""
            n = len(run.recorder.steps)
            if not n:
                return {scrub_group: gr.Group(visible=False)}
            # The live view ends on the last step too (the renders are shared through the run's cache).
            live = {live_latents: app.render(run, n - 1, "latents"), live_channels: app.render(run, n - 1, "channels"),
                    live_x0: app.render(run, n - 1, "x0")}
            # Sent with the group's visibility: updates to children of a hidden group are lost in the browser.
            return live | scrub_outputs(run, n - 1) | step_plots(run) | {scrub_group: gr.Group(visible=True),
                                                scrub: gr.Slider(1, max(n, 2), value=n, step=1, interactive=n > 1)}

        def step_plots(run: Run) -> dict:
            import pandas as pd  # a Gradio dependency; imported here to keep app import light

            sigma_rows = [(s.step + 1, s.sigma) for s in run.recorder.steps if s.sigma is not None]
            delta_rows = [(s.step + 1, s.guidance_delta_norm) for s in run.recorder.steps
                          if s.guidance_delta_norm is not None]
            return {sigma_plot: pd.DataFrame(sigma_rows, columns=["step", "sigma"]),
                    delta_plot: pd.DataFrame(delta_rows, columns=["step", "delta"]),
                    steps_table: pd.DataFrame(app.step_table(run), columns=STEP_COLUMNS)}

        def scrub_outputs(run: Run, step: int) -> dict:
            return {scrub_latents: app.render(run, step, "latents"), scrub_x0: app.render(run, step, "x0"),
                    scrub_cond: app.render(run, step, "x0_cond"), scrub_uncond: app.render(run, step, "x0_uncond"),
                    scrub_delta: app.render(run, step, "delta"), step_info: app.step_text(run, step)}

        def history_outputs() -> dict:
            items = history(app.outputs_dir)
            return {gallery: [(str(Path(f) / "image.png"), caption) for f, caption in items],
                    history_folders: [f for f, _ in items]}

        @gpu
        def run_ui(prompt: str, negative_prompt: str, model: str, scheduler: str, num_inference_steps: float,
                   guidance: str, guidance_scale: float, seed: float | None, randomize_seed: bool, width: float,
                   height: float, x0_preview: str, http: gr.Request, **param_values: float):
            """Streaming handler: start the run, yield the newest step's previews (throttled), then the result."""
            prefix = f"{guidance}__"
            request = app.make_request(
                prompt=prompt, negative_prompt=negative_prompt, model=model, scheduler=scheduler,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                seed=None if randomize_seed or seed is None else _whole_or_error("seed", seed),
                width=width, height=height, guidance=guidance,
                guidance_params={k.removeprefix(prefix): v for k, v in param_values.items() if k.startswith(prefix)},
            )
            run = app.start(request, x0_preview, getattr(http, "session_hash", None))
            try:
                yield {status: "Loading model…" if app.loader.loaded(request.model) is None else "Starting…",
                       scrub_group: gr.Group(visible=False), final_image: None}
                next_at = 0.0
                while not run.done.is_set():
                    event = run.latest.take(timeout=0.25)
                    if event is None or event.step + 1 == event.num_steps:
                        continue  # the last step's previews come with the result, a moment later (rarely, the
                        # newest after a throttle wait is the last step: then it is rendered here, and cached)
                    now = time.perf_counter()
                    if now < next_at:  # too soon: wait, then show whatever is newest by then
                        if run.done.wait(next_at - now):
                            break  # finished meanwhile: the result (with the last step's previews) comes next
                        event = run.latest.take(timeout=0) or event
                    t0 = time.perf_counter()
                    images = [app.render(run, event.step, name) for name in ("latents", "channels", "x0_live")]
                    spent = time.perf_counter() - t0  # rendering only: the yield below waits on Gradio and the browser
                    rate = (event.step + 1) / event.elapsed if event.elapsed > 0 else 0.0
                    sigma = f" · σ = {event.sigma:.3g}" if event.sigma is not None else ""
                    yield {status: f"Step {event.step + 1} / {event.num_steps} · {rate:.1f} it/s{sigma}",
                           live_latents: images[0], live_channels: images[1], live_x0: images[2]}
                    next_at = time.perf_counter() + max(app.preview_interval, RENDER_SHARE * spent)
                result = app.wait(run)
                yield finished(run, result)  # the image first; the last step's previews and the scrubber follow
                yield scrubber(run)
            finally:  # the browser left or Stop cancelled this generator: stop the worker at the next step
                if not run.done.is_set():
                    run.latest.cancel()

        # always_last: a click while the previous run is still finishing (e.g. its scrubber renders) runs next,
        # instead of being dropped as the default trigger mode does.
        gen_event = generate_btn.click(run_ui, inputs_kwargs=control_inputs, outputs=run_outputs,
                                       api_name="generate_stream", show_progress="minimal", show_progress_on=status,
                                       concurrency_id="generate", concurrency_limit=1, trigger_mode="always_last")
        submit_event = prompt.submit(run_ui, inputs_kwargs=control_inputs, outputs=run_outputs,
                                     show_progress="minimal", show_progress_on=status, concurrency_id="generate",
                                     trigger_mode="always_last", api_visibility="private")

        def stop_ui(http: gr.Request):
            """Cancel this session's run at the next step boundary, then show what it made so far."""
            run = app.stop(getattr(http, "session_hash", None))
            if run is None:
                return {}
            if not run.done.wait(STOP_WAIT):
                return {status: "Stopping… (the model is still loading; the run stops before its first step)"}
            if run.error is not None or run.result is None:
                return {status: f"Stopped. {as_gr_error(run.error).message if run.error else ''}".strip()}
            return finished(run, run.result) | scrubber(run)

        # Gradio stops streaming the run (cancels=); the observer's flag stops the loop itself within one step.
        stop_btn.click(stop_ui, outputs=run_outputs, cancels=[gen_event, submit_event], queue=False, api_visibility="private")

        def on_scrub(step: float, rid: str):
            run = app.runs.get(rid)
            if run is None or not run.recorder.steps:
                return {step_info: "This run is no longer in memory; its image and settings are in the history."}
            return scrub_outputs(run, min(max(int(step) - 1, 0), len(run.recorder.steps) - 1))

        scrub.change(on_scrub, inputs_kwargs=dict(step=scrub, rid=run_id),
                     outputs=[scrub_latents, scrub_x0, scrub_cond, scrub_uncond, scrub_delta, step_info],
                     show_progress="hidden", trigger_mode="always_last", api_visibility="private")

        def on_model(model_value: str):
            e = MODELS.get(model_value)
            out = {scheduler: gr.Dropdown(choices=app.scheduler_choices(model_value), value=OWN_SCHEDULER),
                   model_note: app.model_note(model_value), width: 0, height: 0}
            if e is not None or app.loader.loaded(model_value) is not None:
                rec = app.recommended(model_value)
                out |= {num_inference_steps: rec["num_inference_steps"], guidance_scale: rec["guidance_scale"]}
            if e is not None and e.scheduler:
                out[scheduler] = gr.Dropdown(choices=app.scheduler_choices(model_value), value=e.scheduler)
            return out

        model.input(on_model, inputs_kwargs=dict(model_value=model),
                    outputs=[scheduler, model_note, width, height, num_inference_steps, guidance_scale],
                    api_visibility="private")

        def on_method(method: str):
            return {method_note: _method_note(method)} | {g: gr.Group(visible=k == method) for k, g in param_groups.items()}

        guidance.change(on_method, inputs_kwargs=dict(method=guidance), outputs=[method_note, *param_groups.values()],
                        api_visibility="private")

        def on_history_select(folders: list[str], evt: gr.SelectData):
            """Restore a past run's settings (and show its image and code)."""
            if evt.index is None or evt.index >= len(folders):
                return {}
            folder = Path(folders[evt.index])
            try:
                trace = json.loads((folder / "trace.json").read_text())
            except (OSError, ValueError) as e:
                raise gr.Error(f"cannot read {folder.name}/trace.json: {e}", print_exception=False) from None
            req = trace["request"]
            if req.get("model") not in app.models:
                gr.Warning(f"model {req.get('model')!r} of that run is not offered here; model left unchanged")
            out = {
                prompt: req.get("prompt", ""), negative_prompt: req.get("negative_prompt", ""),
                num_inference_steps: req.get("num_inference_steps", 20), guidance_scale: req.get("guidance_scale", 7.5),
                guidance: req.get("guidance", "cfg"), seed: trace.get("seed", req.get("seed")), randomize_seed: False,
                width: req.get("width") or 0, height: req.get("height") or 0,
                final_image: str(folder / "image.png"), run_id: folder.name,
                status: f"Restored the settings of `{folder.name}/` (seed {trace.get('seed')}); press Generate to rerun.",
            }
            try:
                steps = trace.get("steps") or []
                stopped_at = len(steps) if trace.get("cancelled") else None
                out[code] = diffusers_script(
                    GenerationRequest(**(req | {"guidance_params": req.get("guidance_params") or {}})),
                    seed=trace["seed"], width=trace["width"], height=trace["height"], scheduler=trace["scheduler"],
                    family=trace["family"], stopped_at=stopped_at, dtype=app.loader.dtype,
                    device=app.loader.device.type)
            except (KeyError, TypeError, ValueError):  # a trace from an older version: settings only
                out[code] = ""
            run = app.runs.get(folder.name)
            out |= scrubber(run) if run is not None else {scrub_group: gr.Group(visible=False)}  # still in memory?
            if req.get("model") in app.models:
                out[model] = req["model"]
                out[model_note] = app.model_note(req["model"])
                out[scheduler] = gr.Dropdown(choices=app.scheduler_choices(req["model"]),
                                             value=req.get("scheduler") or OWN_SCHEDULER)
            for name, value in (req.get("guidance_params") or {}).items():
                slider = param_sliders.get(f"{req.get('guidance', 'cfg')}__{name}")
                if slider is not None:
                    out[slider] = value
            out |= on_method(req.get("guidance", "cfg"))
            return out

        gallery.select(on_history_select, inputs=[history_folders],
                       outputs=[prompt, negative_prompt, model, model_note, scheduler, num_inference_steps,
                                guidance_scale, guidance, seed, randomize_seed, width, height, final_image, run_id,
                                status, method_note, *param_sliders.values(), *param_groups.values(), scrub_group,
                                scrub, step_info, scrub_latents, scrub_x0, scrub_cond, scrub_uncond, scrub_delta,
                                steps_table, sigma_plot, delta_plot, code, live_latents, live_channels, live_x0],
                       api_visibility="private")

        demo.load(history_outputs, outputs=[gallery, history_folders], api_visibility="private")

        @gpu
        def run_api(prompt: str, negative_prompt: str = "", model: str = default_model, scheduler: str = "",
                    num_inference_steps: float = -1, guidance_scale: float = -1, seed: float = -1, width: float = 0,
                    height: float = 0, guidance: str = "cfg", guidance_params: str = "{}"):
            """Make one image; returns (PNG path with A1111 parameters, seed used, run info). seed -1 is random;
            num_inference_steps / guidance_scale -1 take the model's recommended values; width/height 0 its
            native size; scheduler "" keeps the model's own; guidance_params is a JSON object."""
            try:
                params = json.loads(guidance_params or "{}")
                if not isinstance(params, dict):
                    raise ValueError
            except ValueError:
                raise gr.Error(f'guidance_params must be a JSON object such as {{"guidance_rescale": 0.7}}, '
                               f"got {guidance_params!r}", print_exception=False) from None
            request = app.make_request(
                prompt=prompt, negative_prompt=negative_prompt, model=model or default_model, scheduler=scheduler,
                num_inference_steps=None if num_inference_steps in (None, -1) else num_inference_steps,
                guidance_scale=None if guidance_scale in (None, -1) else guidance_scale,
                seed=None if seed is None or seed < 0 else _whole_or_error("seed", seed),
                width=width, height=height, guidance=guidance, guidance_params=params,
            )
            run = app.start(request, "rgb", None)
            result = app.wait(run)
            info = {"run": run.run_id, "scheduler": result.scheduler, "family": result.family,
                    "width": result.width, "height": result.height, "steps_completed": result.steps_completed,
                    "seconds": round(result.timings.total, 3)}
            return str(run.folder / "image.png"), result.seed, info

        api_button.click(run_api, inputs_kwargs=api_inputs, outputs=[api_image, api_seed, api_info],
                         api_name="generate", concurrency_id="generate")
    return demo


def _whole_or_error(name: str, value: float) -> int:
    try:
        return _whole(name, value)  # type: ignore[return-value]
    except ValueError as e:
        raise gr.Error(str(e), print_exception=False) from None


def _method_note(key: str) -> str:
    spec = METHODS[key]
    params = "" if spec.params else " No parameters."
    return f"**{spec.key}** — {spec.summary}. _{spec.paper}_.{params}"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself when server_name/server_port are not given.
    demo = build_demo(outputs_dir=os.environ.get("PLAYGROUND_OUTPUTS") or ROOT / "outputs")
    demo.queue(max_size=32).launch(show_error=True)
