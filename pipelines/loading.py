"""Explicit, lazy, cached pipeline loading. Nothing is loaded until a generation asks for it."""

from __future__ import annotations

import inspect
import os
import threading
from collections import OrderedDict
from typing import Any, Iterable

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from pipelines.registry import MODELS, resolve
from pipelines.schedulers import key_of, make_scheduler


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
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allowed: Iterable[str] | None = None,
        max_cached: int = 1,
        offload: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self._dtype_chosen = dtype is not None  # an explicit dtype beats a registry entry's preference
        self.allowed = list(allowed) if allowed is not None else None
        self.max_cached = max_cached
        self.offload = offload
        self._pipes: OrderedDict[str, DiffusionPipeline] = OrderedDict()
        self._pinned: dict[str, DiffusionPipeline] = {}
        self._views: dict[tuple[str, str | None], DiffusionPipeline] = {}
        self._lock = threading.RLock()
        self.run_lock = threading.Lock()  # one denoising run at a time: the views' schedulers are stateful

    def add(self, name: str, pipe: DiffusionPipeline) -> None:
        """Register an already built pipeline under `name` (tests, injected models). It is never evicted."""
        pipe.set_progress_bar_config(disable=True)
        with self._lock:
            self._pinned[name] = pipe
            self._views = {k: v for k, v in self._views.items() if k[0] != name}

    def check_allowed(self, model: str) -> None:
        if self.allowed is not None and model not in self.allowed and model not in self._pinned:
            raise ValueError(f"model {model!r} is not offered here; choose one of: {', '.join(self.allowed)}")

    def get(self, model: str) -> DiffusionPipeline:
        """The loaded pipeline for a registry key, folder or hub id."""
        self.check_allowed(model)
        with self._lock:
            if model in self._pinned:
                return self._pinned[model]
            if model in self._pipes:
                self._pipes.move_to_end(model)
                return self._pipes[model]
            pipe = self._load(model)
            self._pipes[model] = pipe
            while len(self._pipes) > self.max_cached:
                old, _ = self._pipes.popitem(last=False)
                self._views = {k: v for k, v in self._views.items() if k[0] != old}
            return pipe

    def loaded(self, model: str) -> DiffusionPipeline | None:
        """The pipeline for `model` if it is already in memory, else None; never loads, never waits.

        No lock: get() holds it for the whole of a load, and a UI asking "is it loaded?" must not wait
        minutes for the answer. Single dict reads are atomic in CPython.
        """
        pipe = self._pinned.get(model)
        return pipe if pipe is not None else self._pipes.get(model)

    def view(self, model: str, scheduler: str | None) -> tuple[DiffusionPipeline, str]:
        """The pipeline for `model` with a fresh scheduler `scheduler` (None: the model's own), and its key."""
        pipe = self.get(model)
        with self._lock:
            view = self._views.get((model, scheduler))
            if view is None:
                view = with_scheduler(pipe, make_scheduler(pipe.scheduler, scheduler))
                self._views[(model, scheduler)] = view
        return view, key_of(view.scheduler)

    def _load(self, model: str) -> DiffusionPipeline:
        source = resolve(model)
        is_dir = os.path.isdir(source)
        dtype = self.dtype
        entry = MODELS.get(model)
        if entry is not None and self.device.type == "cuda" and not self._dtype_chosen:
            dtype = getattr(torch, entry.cuda_dtype)  # e.g. SD3.5 is meant to run in bf16
        if not is_dir and (source.startswith((".", "/", "~")) or os.sep in source and source.count("/") != 1):
            raise ValueError(f"model {model!r}: no such folder; give a registry key, a diffusers folder or a hub id")
        try:
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            where = "folder" if is_dir else "hub id"
            hint = "" if is_dir else " (offline, only models already in the Hugging Face cache load)"
            raise ValueError(f"model {model!r} could not be loaded as a diffusers {where}{hint}: {e}") from e
        # SDXL's VAE overflows in fp16 (diffusers' force_upcast); keep it in fp32 instead of flipping it per call.
        if isinstance(pipe, StableDiffusionXLPipeline) and pipe.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.vae.to(torch.float32)
        if self.offload and self.device.type == "cuda":
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe
