"""Explicit, lazy, cached pipeline loading. Nothing is loaded until a generation asks for it."""

from __future__ import annotations

import gc
import inspect
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Iterable

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from pipelines import threads as thread_probe
from pipelines.previews import Previewer
from pipelines.profile import ModelProfile, build_profile
from pipelines.registry import MODELS, resolve
from pipelines.schedulers import denoiser_config, key_of, make_scheduler
from pipelines.traced import SMALL_DENOISER_PARAMS, TracedUNet, num_params, traceable

# diffusers' tail on load errors; it points at a stack trace the user of the UI or CLI never sees.
_STACKTRACE_HINT = "Please check out the root cause in the stacktrace above."


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import):
    HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return hf_constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (now, or when huggingface_hub was imported), as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or bool(hf_constants.HF_HUB_OFFLINE)


def is_hub_id(source: str) -> bool:
    """Whether a model source names a hub repo ("org/name", or a legacy "name") rather than a local path."""
    if os.path.isdir(source) or source.startswith((".", "/", "~")):
        return False
    return source.count("/") == 1 or "/" not in source and os.sep not in source


def is_available_offline(model: str) -> bool:
    """Whether `model` (registry key, folder or hub id) can load without the network: a local folder with a
    model_index.json, or a hub id whose model_index.json is in the local Hugging Face cache. Never goes online.

    A cached model_index.json with weights missing (an interrupted download) still reads True; loading then fails
    with a one-line error that says so.
    """
    source = resolve(model)
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, "model_index.json"))
    if not is_hub_id(source):
        return False
    try:
        found = try_to_load_from_cache(source, "model_index.json", cache_dir=hub_cache_dir())
    except ValueError:  # HFValidationError: not a valid repo id
        return False
    return isinstance(found, str)  # else None (never fetched) or _CACHED_NO_EXIST (known missing upstream)


def _named(model: str, source: str) -> str:
    return f"model {model!r}" + (f" ({source})" if source != model else "")


def _one_line(error: BaseException) -> str:
    """An exception's message on one line, without diffusers' pointer to a stack trace."""
    return " ".join(str(error).replace(_STACKTRACE_HINT, "").split()).rstrip(" .") or type(error).__name__


def with_scheduler(pipe: DiffusionPipeline, scheduler: Any) -> DiffusionPipeline:
    """A pipeline object sharing `pipe`'s modules (no copies, no dtype casts) but owning `scheduler`.

    Like `DiffusionPipeline.from_pipe`, minus its `.to(dtype)` on the shared modules. The view is built
    with the model's own scheduler and then given `scheduler` by plain assignment, exactly as users swap
    schedulers (`pipe.scheduler = X.from_config(...)`), so __init__'s legacy config fix-ups do not touch it.
    """
    cls = type(pipe)
    components = pipe.components
    kwargs = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name in components:
            kwargs[name] = components[name]
        elif name in pipe.config:
            kwargs[name] = pipe.config[name]
    view = cls(**kwargs)
    view.scheduler = scheduler
    view.set_progress_bar_config(disable=True)
    return view


class ModelLoader:
    """Loads pipelines on first use and keeps the most recent ones; hands out per-scheduler views.

    device/dtype: where and how to load (defaults: CUDA with fp16 when available, else CPU fp32).
    allowed: when set, only these registry keys, folders or hub ids may be loaded (the UI's allow-list).
    max_cached: how many loaded models to keep in memory.
    offload: on CUDA, use accelerate's model CPU offload instead of moving the whole pipeline.
    switch_cooldown: seconds a loaded model is kept before another may replace it (Limits.model_switch_seconds;
    0: no wait). With one model cached, callers alternating two models would otherwise reload on every request.
    trace: run small CPU UNets through TorchScript traces (pipelines/traced.py: same output, faster, and they
    let go of the GIL while they compute); False runs every model eagerly.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allowed: Iterable[str] | None = None,
        max_cached: int = 1,
        offload: bool = False,
        switch_cooldown: float = 0.0,
        trace: bool = True,
        thread_cache: thread_probe.ThreadCache | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self._dtype_chosen = dtype is not None  # an explicit dtype beats a registry entry's preference
        self.allowed = list(allowed) if allowed is not None else None
        self.max_cached = max_cached
        self.offload = offload
        self.switch_cooldown = switch_cooldown
        self.trace = trace
        self.thread_cache = thread_cache or thread_probe.ThreadCache.default()  # measured thread counts, on disk
        # Per denoiser module (views share one; gone with the model): its traces (None: not traceable), whether small.
        self._traced: weakref.WeakKeyDictionary[torch.nn.Module, TracedUNet | None] = weakref.WeakKeyDictionary()
        self._small: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
        self._loaded_at: dict[str, float] = {}  # model -> time.monotonic() when it was loaded
        self._pipes: OrderedDict[str, DiffusionPipeline] = OrderedDict()
        self._pinned: dict[str, DiffusionPipeline] = {}
        self._views: dict[tuple[str, str | None], DiffusionPipeline] = {}
        # Per model, dropped with it: its previewer and profile (resolved once), thread choices per size and setting.
        self._previewers: dict[str, Previewer] = {}
        self._profiles: dict[str, ModelProfile] = {}
        self._threads: dict[tuple[str, tuple[int, int], int, bool, int], thread_probe.ThreadChoice] = {}
        self._lock = threading.RLock()
        self.run_lock = threading.Lock()  # one denoising run at a time: the views' schedulers are stateful

    def add(self, name: str, pipe: DiffusionPipeline) -> None:
        """Register an already built pipeline under `name` (tests, injected models). It is never evicted."""
        pipe.set_progress_bar_config(disable=True)
        with self._lock:
            self._pinned[name] = pipe
            self._forget(name)

    def check_allowed(self, model: str) -> None:
        if self.allowed is not None and model not in self.allowed and model not in self._pinned:
            shown = repr(model) if len(model) <= 60 else repr(model[:59] + "…")
            raise ValueError(f"model {shown} is not offered here; choose one of: {', '.join(self.allowed)}")

    def check_switch(self, model: str) -> None:
        """Refuse to load `model` while that would evict a model loaded less than switch_cooldown seconds ago."""
        if self.switch_cooldown <= 0 or model in self._pinned or model in self._pipes:
            return
        if len(self._pipes) < self.max_cached:
            return
        oldest = next(iter(self._pipes))
        wait = self._loaded_at.get(oldest, 0.0) + self.switch_cooldown - time.monotonic()
        if wait > 0:
            raise ValueError(f"model {oldest!r} was loaded {self.switch_cooldown - wait:.0f} s ago and this server "
                             f"changes models at most every {self.switch_cooldown:g} s "
                             f"(PLAYGROUND_MODEL_SWITCH_SECONDS); try {model!r} again in {math.ceil(wait)} s")

    def get(self, model: str) -> DiffusionPipeline:
        """The loaded pipeline for a registry key, folder or hub id."""
        self.check_allowed(model)
        with self._lock:
            if model in self._pinned:
                return self._pinned[model]
            if model in self._pipes:
                self._pipes.move_to_end(model)
                return self._pipes[model]
            self.check_switch(model)
            self._check_source(model)
            # Evict before loading, so two models are never in memory at once (and the old one's memory is freed).
            while self._pipes and len(self._pipes) >= self.max_cached:
                old, _ = self._pipes.popitem(last=False)
                self._loaded_at.pop(old, None)
                self._forget(old)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            pipe = self._load(model)
            self._pipes[model] = pipe
            self._loaded_at[model] = time.monotonic()
            return pipe

    def loaded(self, model: str) -> DiffusionPipeline | None:
        """The pipeline for `model` if it is already in memory, else None; never loads, never waits.

        No lock: get() holds it for the whole of a load, and a UI asking "is it loaded?" must not wait
        minutes for the answer. Single dict reads are atomic in CPython.
        """
        pipe = self._pinned.get(model)
        return pipe if pipe is not None else self._pipes.get(model)

    def _forget(self, model: str) -> None:
        """Drop what was derived from `model`'s pipeline (views, previewer, profile, thread choices)."""
        self._views = {k: v for k, v in self._views.items() if k[0] != model}
        self._previewers.pop(model, None)
        self._profiles.pop(model, None)
        self._threads = {k: v for k, v in self._threads.items() if k[0] != model}

    def previewer(self, model: str) -> Previewer:
        """The previewer of `model`, built once from the loaded pipeline (whose folder holds its preview decoder;
        a scheduler view's config does not name it)."""
        pipe = self.get(model)
        with self._lock:
            previewer = self._previewers.get(model)
            if previewer is None or previewer.pipe is not pipe:
                previewer = self._previewers[model] = Previewer(pipe)
        return previewer

    def profile(self, model: str) -> ModelProfile:
        """What is known about `model` on this loader's device (pipelines/profile.py), resolved once per load."""
        pipe = self.get(model)
        with self._lock:
            profile = self._profiles.get(model)
            if profile is None:
                offload = self.offload and self.device.type == "cuda"  # accelerate's offload hooks exist on CUDA only
                profile = self._profiles[model] = build_profile(model, pipe, self.previewer(model), self.device.type,
                                                                offload)
        return profile

    def threads(self, model: str, height: int | None, width: int | None, *, serving: bool,
                default: int, images: int = 1) -> thread_probe.ThreadChoice:
        """torch's thread count for runs of `model` at height x width (None: its native size), measured on first
        use of that size (pipelines/threads.py) and kept with the model. serving: the web app, where the event
        loop and previews need a core."""
        pipe = self.get(model)
        profile = self.profile(model)
        side = profile.native_size
        hw = ((height or side) // pipe.vae_scale_factor, (width or side) // pipe.vae_scale_factor)
        key = (model, hw, images, serving, default)
        with self._lock:  # one probe at a time; runs wait for it anyway (run_lock)
            choice = self._threads.get(key)
            if choice is None:
                denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
                choice = self._threads[key] = thread_probe.choose_cached(denoiser, hw, self.device, default, serving,
                                                                         self.thread_cache, images)
        return choice

    def view(self, model: str, scheduler: str | None) -> tuple[DiffusionPipeline, str]:
        """The pipeline for `model` with a fresh scheduler `scheduler` (None: the model's own), and its key."""
        pipe = self.get(model)
        with self._lock:
            view = self._views.get((model, scheduler))
            if view is None:
                view = with_scheduler(pipe, make_scheduler(pipe.scheduler, scheduler, denoiser_config(pipe)))
                self._views[(model, scheduler)] = view
        return view, key_of(view.scheduler)

    def traced_unet(self, pipe: DiffusionPipeline) -> TracedUNet | None:
        """The traces of `pipe`'s UNet for this run, or None where it runs eagerly: tracing is off, the UNet is
        not traceable (pipelines/traced.py) or not small (small_denoiser), or its attention processors are not those
        traced (PAG's swap).
        Views of one model share one UNet and so one set of traces; they go when the model is evicted."""
        unet = getattr(pipe, "unet", None)
        if not self.trace or unet is None:
            return None
        with self._lock:  # decided once per UNet
            if unet in self._traced:
                traced = self._traced[unet]
            else:
                worth_it = traceable(unet) and self.small_denoiser(pipe)  # RLock: small_denoiser takes it again
                traced = self._traced[unet] = TracedUNet(unet) if worth_it else None
        return traced if traced is not None and traced.is_current() else None

    def small_denoiser(self, pipe: DiffusionPipeline) -> bool:
        """Whether `pipe`'s UNet or transformer has fewer than SMALL_DENOISER_PARAMS parameters (counted once)."""
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None:
            return False
        with self._lock:
            small = self._small.get(denoiser)
            if small is None:
                small = self._small[denoiser] = num_params(denoiser) < SMALL_DENOISER_PARAMS
        return small

    def _check_source(self, model: str) -> None:
        """Refuse, before anything is evicted, a model that cannot load: no such folder, or uncached while offline."""
        source = resolve(model)
        is_dir = os.path.isdir(source)
        if not is_dir and not is_hub_id(source):
            raise ValueError(f"model {model!r}: no such folder; give a registry key, a diffusers folder or a hub id")
        if not is_dir and hub_offline() and not is_available_offline(source):
            raise ValueError(
                f"{_named(model, source)} is not in the local Hugging Face cache ({hub_cache_dir()}) and this machine "
                f"is offline; download it once with `hf download {source}` or unset HF_HUB_OFFLINE"
            )

    def _load(self, model: str) -> DiffusionPipeline:
        source = resolve(model)
        is_dir = os.path.isdir(source)
        dtype = self.dtype
        entry = MODELS.get(model)
        if entry is not None and self.device.type == "cuda" and not self._dtype_chosen:
            dtype = getattr(torch, entry.cuda_dtype)  # e.g. SD3.5 is meant to run in bf16
        self._check_source(model)
        offline = not is_dir and hub_offline()
        cached = is_dir or is_available_offline(source)
        try:
            kwargs = {} if is_dir else {"cache_dir": hub_cache_dir()}
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **kwargs)
        except (OSError, ValueError, EnvironmentError) as e:
            where = "folder" if is_dir else "hub id"
            hint = ""
            if offline:  # model_index.json is cached, so part of the download is missing
                hint = f"; it is only partly in the local Hugging Face cache: finish it with `hf download {source}`"
            elif not is_dir and not cached:  # the what-to-do first: the library's own words may be cut for the client
                raise ValueError(f"{_named(model, source)} is not downloaded on this server and could not be fetched "
                                 f"from the Hugging Face Hub (no network, or the Hub refused); run `hf download "
                                 f"{source}` where there is network. The loader said: {_one_line(e)}") from e
            raise ValueError(f"{_named(model, source)} could not be loaded as a diffusers {where}: {_one_line(e)}{hint}") from e
        # SDXL's VAE overflows in fp16 (diffusers' force_upcast); keep it in fp32 instead of flipping it per call.
        if isinstance(pipe, StableDiffusionXLPipeline) and pipe.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)
        if self.offload and self.device.type == "cuda":
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
