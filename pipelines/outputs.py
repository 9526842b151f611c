"""Files a run leaves behind: PNG with A1111 `parameters` + request JSON, trace.json, per-step previews and,
optionally, the per-step latents for scrubbing later (steps/tensors.safetensors).

Every file is written atomically (temporary name, then rename), so a reader never sees half a file.
trace.json has one writer and one reader: Trace.write and Trace.read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines.limits import Limits
from pipelines.observers import Observer
from pipelines.previews import Previewer
from pipelines.schedulers import SCHEDULERS
from pipelines.types import GenerationRequest, GenerationResult, StepEvent, Timings

TRACE_FILE = "trace.json"
TRACE_MAX_BYTES = 4 * 2**20  # Trace.read refuses larger files (a 1000-step trace is ~0.3 MB)
STEP_TENSORS_FILE = "steps/tensors.safetensors"
STEP_TENSORS_LIMIT = 32 * 2**20  # bytes: save_step_tensors' default cap (a 64×64 model's 20 steps take ~20 KB)


def a1111_parameters(request: GenerationRequest, result: GenerationResult, index: int = 0) -> str:
    """The AUTOMATIC1111 `parameters` text of image `index` of the run: prompt, 'Negative prompt:' line, then
    'Key: value, ...' (a batch's images carry their own seed, seed + index, and A1111's 'Batch size'/'Batch pos')."""
    spec = SCHEDULERS.get(result.scheduler)
    fields: list[tuple[str, Any]] = [
        ("Steps", request.num_inference_steps),
        ("Sampler", spec.label if spec else result.scheduler),
    ]
    if spec is not None and spec.key == "dpmpp_2m_karras":
        fields.append(("Schedule type", "Karras"))
    fields += [
        ("CFG scale", f"{request.guidance_scale:g}"),
        ("Seed", result.seed + index),
        ("Size", f"{result.width}x{result.height}"),
        ("Model", Path(request.model).name if os.sep in request.model and os.path.isdir(request.model) else request.model),
    ]
    if request.guidance != "cfg":
        params = " ".join(f"{k}={v:g}" for k, v in sorted(request.guidance_params.items()))
        fields.append(("Guidance", f"{request.guidance} {params}".strip()))
    if "guidance_rescale" in request.guidance_params:
        fields.append(("CFG Rescale phi", f"{request.guidance_params['guidance_rescale']:g}"))
    if request.num_images_per_prompt > 1:
        fields += [("Batch size", request.num_images_per_prompt), ("Batch pos", index)]
    if result.cancelled:
        fields.append(("Stopped at step", result.steps_completed))
    text = _one_line(request.prompt)
    if request.negative_prompt:
        text += f"\nNegative prompt: {_one_line(request.negative_prompt)}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in fields)


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(path: str | os.PathLike, image: Image.Image | np.ndarray, text: dict[str, str] | None = None,
             compress_level: int = 6) -> Path:
    """Write a PNG atomically, with optional tEXt chunks; compress_level 1 encodes a 128² preview in 2.0 ms instead of
    Pillow's default 6's 2.4 ms for a file ~5% larger (the same pixels: PNG is lossless)."""
    path = Path(path)
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    _atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info, compress_level=compress_level))
    return path


def image_name(index: int) -> str:
    """The file of image `index` of a run's batch: image.png, then image_1.png, image_2.png … (seed + index)."""
    return "image.png" if index == 0 else f"image_{index}.png"


def save_image(path: str | os.PathLike, result: GenerationResult, index: int = 0) -> Path:
    """Image `index` of the run with A1111 `parameters` and, as JSON in `request`, the request that makes this image
    alone (its seed, seed + index; one image), so any image of a batch can be reproduced and shared by itself."""
    alone = result.request.image_alone(result.seed, index)
    request_json = json.dumps(alone.to_dict(), sort_keys=True)
    return save_png(path, result.images[index],
                    {"parameters": a1111_parameters(result.request, result, index), "request": request_json})


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))
    return path


# --- trace.json ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """A finished run's record, written to <folder>/trace.json next to <folder>/image.png."""

    image: str  # file name of the final PNG inside the run folder ("image.png"; a batch's first image)
    seed: int  # the seed used
    request: GenerationRequest  # the request, with `seed` filled in (so it reproduces the image)
    scheduler: str  # scheduler key used (or the class name of a model's own scheduler outside the registry)
    family: str  # model family key
    width: int  # pixels rendered
    height: int  # pixels rendered
    cancelled: bool  # stopped early; then image is the decoded last x̂0
    timings: Timings  # per-phase wall-clock seconds
    preview_kinds: Mapping[str, str]  # preview name -> Previewer kind used for it
    latent_format: str  # the model's latent-format record name (pipelines/previews.py)
    steps: tuple[StepEvent, ...]  # one per completed loop iteration: numbers and previews, no tensors
    images: tuple[str, ...] = ()  # a batch's image files in order, image i from seed + i (() or one: just `image`)
    threads: int | None = None  # torch's CPU threads during the run (GenerationResult.threads); None: not recorded

    def __post_init__(self) -> None:
        if not self.images:
            object.__setattr__(self, "images", (self.image,))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of trace.json (key names and order as written since the format began)."""
        return {
            "image": self.image,
            "seed": self.seed,
            "request": self.request.to_dict(),
            "scheduler": self.scheduler,
            "family": self.family,
            "width": self.width,
            "height": self.height,
            "cancelled": self.cancelled,
            "timings": dataclasses.asdict(self.timings),
            "preview_kinds": dict(self.preview_kinds),
            "latent_format": self.latent_format,
            "steps": [s.numbers() | {"previews": dict(s.previews)} for s in self.steps],
        } | ({"images": list(self.images)} if len(self.images) > 1 else {}) | (
            {"threads": self.threads} if self.threads is not None else {})

    def write(self, folder: str | os.PathLike) -> Path:
        """Write <folder>/trace.json atomically; return its path."""
        return write_json(Path(folder) / TRACE_FILE, self.to_dict())

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Trace:
        """The trace of a run folder; ValueError naming the folder and what is wrong for anything malformed:
        unreadable or non-object JSON, missing or mistyped fields, an invalid request, or an image that is
        missing, not a regular file, a symbolic link or outside the folder."""
        folder = Path(folder)
        path = folder / TRACE_FILE
        where = str(path)
        if os.path.islink(folder):
            raise ValueError(f"{where}: the run folder {folder} is a symbolic link; a run folder is a real folder")
        _regular_file(path, where)
        try:
            with open(path, "rb") as f:
                raw = f.read(TRACE_MAX_BYTES + 1)
            if len(raw) > TRACE_MAX_BYTES:
                raise ValueError(f"larger than {TRACE_MAX_BYTES} bytes")
            data = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
            raise ValueError(f"{where}: not readable JSON: {type(e).__name__ if isinstance(e, RecursionError) else e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must hold a JSON object, got {type(data).__name__}")
        try:
            return cls._from_dict(data, folder, where)
        except (TypeError, ArithmeticError, RecursionError) as e:  # e.g. an integer too large for a float
            raise ValueError(f"{where}: malformed ({type(e).__name__})") from None

    @classmethod
    def _from_dict(cls, data: dict[str, Any], folder: Path, where: str) -> Trace:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.name not in ("images", "threads")]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        image = _typed(data, "image", str, where)
        if image in ("", ".", "..") or PurePosixPath(image).name != image or os.sep in image:
            raise ValueError(f"{where}: image must be a file name inside the run folder, got {image!r}")
        _regular_file(folder / image, f"{where}: image {image!r}")
        seed = _typed(data, "seed", int, where)
        request_data = data["request"]
        if not isinstance(request_data, dict):
            raise ValueError(f"{where}: request must be a JSON object, got {type(request_data).__name__}")
        try:
            request = GenerationRequest(**request_data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: invalid request: {e}") from None
        if request.seed != seed:
            raise ValueError(f"{where}: request seed {request.seed!r} differs from the trace's seed {seed}")
        timings_data = _typed(data, "timings", dict, where)
        timing_names = [f.name for f in dataclasses.fields(Timings)]
        if sorted(timings_data) != sorted(timing_names):
            raise ValueError(f"{where}: timings must have exactly {', '.join(timing_names)}, got {', '.join(timings_data)}")
        timings = Timings(**{k: _number(timings_data, k, f"{where}: timings") for k in timing_names})
        steps_data = _typed(data, "steps", list, where)
        images = tuple(data.get("images") or (image,))
        if images[0] != image or len(images) != request.num_images_per_prompt or any(
                not isinstance(name, str) or name != image_name(i) for i, name in enumerate(images)):
            raise ValueError(f"{where}: images must name the batch's {request.num_images_per_prompt} files "
                             f"{', '.join(image_name(i) for i in range(request.num_images_per_prompt))}")
        for name in images[1:]:
            _regular_file(folder / name, f"{where}: image {name!r}")
        return cls(
            images=images,
            image=image,
            seed=seed,
            request=request,
            scheduler=_typed(data, "scheduler", str, where),
            family=_typed(data, "family", str, where),
            width=_typed(data, "width", int, where),
            height=_typed(data, "height", int, where),
            cancelled=_typed(data, "cancelled", bool, where),
            timings=timings,
            preview_kinds=_str_map(data, "preview_kinds", where),
            latent_format=_typed(data, "latent_format", str, where),
            steps=tuple(_trace_step(s, f"{where}: steps[{i}]", len(steps_data)) for i, s in enumerate(steps_data)),
            threads=_typed(data, "threads", int, where) if data.get("threads") is not None else None,
        )


def _typed(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """data[key] if it is a `kind` (an int is not a bool, a bool not an int); else ValueError."""
    if key not in data:
        raise ValueError(f"{where}: missing {key}")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "a JSON object", list: "a JSON list"}


def _number(data: Mapping[str, Any], key: str, where: str, optional: bool = False) -> float | None:
    """A JSON number (ints allowed, bools not) as float; None allowed when optional. NaN/inf are kept: a run
    whose guidance diverged still has a readable trace."""
    if key not in data:
        raise ValueError(f"{where}: missing {key}")
    value = data[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number{' or null' if optional else ''}, got {value!r}")
    return float(value)


def _str_map(data: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = _typed(data, key, dict, where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{where}: {key} must map strings to strings, got {value!r}")
    return value


def _trace_step(data: Any, where: str, count: int) -> StepEvent:
    """A step of trace.json (numbers and previews); `count`, the steps recorded, stands in for num_steps in a trace
    written before num_steps was."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(data).__name__}")
    previews = _str_map(data, "previews", where)
    for name, rel in previews.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise ValueError(f"{where}: preview {name!r} must be a path inside the run folder, got {rel!r}")
    return StepEvent(
        step=_typed(data, "step", int, where),
        num_steps=_typed(data, "num_steps", int, where) if "num_steps" in data else count,
        latents=None, denoised=None, denoised_cond=None, denoised_uncond=None,
        timestep=_number(data, "timestep", where),
        sigma=_number(data, "sigma", where, optional=True),
        effective_scale=_number(data, "effective_scale", where),
        guidance_delta_norm=_number(data, "guidance_delta_norm", where, optional=True),
        elapsed=_number(data, "elapsed", where),
        previews=previews,
    )


def _regular_file(path: Path, where: str) -> None:
    """Refuse a path that is missing, a symbolic link (a run folder never holds one; it could point anywhere) or
    not a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{where}: {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path}: {e}") from None
    if stat.S_ISLNK(mode):
        raise ValueError(f"{where}: {path} is a symbolic link; a run folder holds only its own files")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{where}: {path} is not a regular file")


# --- per-step tensors -----------------------------------------------------------------------------------------------


# The file: one float16 tensor (C, h, w) per step and field, named "<step:04d>.<field>" (field one of
# StepEvent.TENSORS), first image of the batch only, with metadata {"format": STEP_TENSORS_FORMAT}. The numbers of
# each step live in trace.json; load_step_tensors puts the two back together.
STEP_TENSORS_FORMAT = "playground-step-tensors-1"


def save_step_tensors(folder: str | os.PathLike, steps: Sequence[StepEvent],
                      limit_bytes: int = STEP_TENSORS_LIMIT) -> bool:
    """Write <folder>/steps/tensors.safetensors with float16 copies of each step's tensors (first image of the
    batch only), if they fit in limit_bytes.

    Returns whether the file was written; nothing is written when the tensors would exceed the limit.
    """
    tensors: dict[str, torch.Tensor] = {}
    size = 0
    for s in steps:
        for name, value in s.tensors().items():
            t = value[0] if value.ndim == 4 else value
            t = t.detach().to("cpu", torch.float16).contiguous()
            size += t.numel() * t.element_size()
            if size > limit_bytes:
                return False
            tensors[f"{s.step:04d}.{name}"] = t
    path = Path(folder) / STEP_TENSORS_FILE
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": STEP_TENSORS_FORMAT}))
    return True


def load_step_tensors(folder: str | os.PathLike, steps: Sequence[StepEvent]) -> tuple[StepEvent, ...]:
    """`steps` (a trace's records: numbers, no tensors) with the tensors saved by save_step_tensors put back, as
    float32 (1, C, h, w), the form a StepRecorder keeps; ValueError when the file is missing or malformed or holds
    a step `steps` lacks, or lacks one it has."""
    path = Path(folder) / STEP_TENSORS_FILE
    _regular_file(path, str(path))
    try:
        flat = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from None
    by_step: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        step, _, name = key.partition(".")
        if not step.isdigit() or name not in StepEvent.TENSORS:
            raise ValueError(f"{path}: unexpected tensor {key!r}; keys are <step>.<{'|'.join(StepEvent.TENSORS)}>")
        by_step.setdefault(int(step), {})[name] = t.float().unsqueeze(0)
    numbers = {s.step: s for s in steps}
    if set(by_step) != set(numbers):
        raise ValueError(f"{path}: holds steps {sorted(by_step)}, the trace records steps {sorted(numbers)}")
    out = []
    for step in sorted(by_step):
        found = by_step[step]
        if "latents" not in found or "denoised" not in found:
            raise ValueError(f"{path}: step {step} lacks latents or denoised")
        out.append(dataclasses.replace(numbers[step], **{k: found.get(k) for k in StepEvent.TENSORS}))
    return tuple(out)


class TraceWriter(Observer):
    """Writes per-step previews under out_dir/steps/ as the run goes, and trace.json + image.png at the end.

    previews: which images to write each step, as {name: (source, kind)} with source one of
    "latents", "denoised", "denoised_cond", "denoised_uncond" and kind a Previewer kind or "fast" (the model's
    cheapest colour preview); a kind the model does not offer is refused, never swapped for another.
    tensors_limit_bytes: when > 0, also keep each step's first-image tensors (float16) and save them to
    steps/tensors.safetensors at finish if they fit (see save_step_tensors; `tensors_saved` tells).
    """

    DEFAULT_PREVIEWS = {"latents": ("latents", "fast"), "x0": ("denoised", "decode")}

    def __init__(self, out_dir: str | os.PathLike, previewer: Previewer,
                 previews: dict[str, tuple[str, str]] | None = None, tensors_limit_bytes: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.previewer = previewer
        wanted = previews if previews is not None else self.DEFAULT_PREVIEWS
        self.previews = {name: (src, previewer.resolve(kind)) for name, (src, kind) in wanted.items()}
        self.steps: list[StepEvent] = []  # numbers and previews
        self.tensors_limit_bytes = tensors_limit_bytes
        self._tensors: list[StepEvent] | None = [] if tensors_limit_bytes > 0 else None  # first image, fp16
        self._tensor_bytes = 0
        self.tensors_saved = False  # set by finish()
        # Previews are rendered and written on a thread of their own while the loop goes on (finish() waits for
        # them) when torch leaves a core free: a step's two previews cost the embedded model ~3 ms, a third of its
        # step, on one torch thread of two cores. When torch's threads take every core, a writer beside them stalls
        # each op's barrier (the 17M UNet's 30 steps: 3.4 s in line, 4.2 s beside): then they are written in line.
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace-writer")
                      if torch.get_num_threads() < (os.cpu_count() or 1) else None)
        self._writes: list[Future] = []

    def on_step(self, event: StepEvent) -> None:
        previews = {}
        for name, (source, kind) in self.previews.items():
            latents = getattr(event, source)
            if latents is None:
                continue
            rel = f"steps/{event.step:03d}_{name}.png"
            if self._pool is None:
                self._write(self.out_dir / rel, kind, latents)
            else:  # a copy, so later steps cannot change what is drawn
                self._writes.append(self._pool.submit(self._write, self.out_dir / rel, kind, latents.detach().clone()))
            previews[name] = rel
        self.steps.append(dataclasses.replace(event.numbers_only(), elapsed=round(event.elapsed, 4), previews=previews))
        if self._tensors is not None:
            kept = event.first_image(torch.float16)
            self._tensor_bytes += kept.nbytes
            if self._tensor_bytes <= self.tensors_limit_bytes:
                self._tensors.append(kept)
            else:  # nothing will be saved: stop holding memory for it
                self._tensors = None

    def _write(self, path: Path, kind: str, latents: torch.Tensor) -> None:
        save_png(path, self.previewer.render(kind, latents), compress_level=1)  # a step preview: written 2x a step

    def finish(self, result: GenerationResult) -> Trace:
        """Wait for the step previews, write image.png, trace.json and (when kept and within the limit) the step
        tensors; return the trace. A preview that failed to render or write raises here."""
        try:
            for write in self._writes:
                write.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
        names = tuple(image_name(i) for i in range(len(result.images)))
        for i, name in enumerate(names):
            save_image(self.out_dir / name, result, i)
        trace = Trace(
            image=names[0],
            images=names,
            seed=result.seed,
            request=dataclasses.replace(result.request, seed=result.seed),
            scheduler=result.scheduler,
            family=result.family,
            width=result.width,
            height=result.height,
            cancelled=result.cancelled,
            timings=Timings(**{k: round(v, 4) for k, v in vars(result.timings).items()}),
            preview_kinds={name: kind for name, (_, kind) in self.previews.items()},
            latent_format=self.previewer.format.name,
            steps=tuple(self.steps),
            threads=result.threads,
        )
        if self._tensors is not None:
            self.tensors_saved = save_step_tensors(self.out_dir, self._tensors, self.tensors_limit_bytes)
        trace.write(self.out_dir)
        return trace


# --- retention and orphans ------------------------------------------------------------------------------------------
#
# A run folder is finished once its trace.json exists: TraceWriter.finish writes it last, atomically, after image.png
# and the step tensors, and history lists only folders whose trace reads. A run killed mid-way leaves a folder without
# a trace (steps/ previews, maybe image.png or a temporary file), which history never shows and clean_orphans removes.
# Both functions below only ever delete folders that hold nothing but the files a run writes (RUN_FILES, steps/ with
# its previews and tensors, temporary files), never follow a symbolic link, and never touch anything else.

RUN_FILES = frozenset({"image.png", TRACE_FILE, "steps"})  # what a run folder holds (besides temporary files)
_BATCH_IMAGE = re.compile(r"image_[1-9][0-9]?\.png")  # a batch's further images (image_name)
_STEP_FILE = re.compile(r"\d{3,}_[A-Za-z0-9_]+\.png|tensors\.safetensors")  # steps/NNN_<preview>.png, the tensors
_TEMP_FILE = re.compile(r"\..+\.tmp")  # _atomic_write's temporary names: .<name>.<random>.tmp
_DELETING = ".deleting-"  # a run folder being removed is first renamed to this prefix + its name

log = logging.getLogger("playground")


@dataclass(frozen=True)
class RunFolder:
    """A folder directly under the outputs folder that holds only what a run writes."""

    path: Path  # the folder
    finished: bool  # trace.json is a regular file (whether it parses is Trace.read's business)
    mtime: float  # trace.json's modification time (finished runs), else the newest entry's
    size: int  # bytes of its regular files, steps/ included
    temp_files: tuple[Path, ...]  # leftovers of interrupted atomic writes, inside it or its steps/


def scan_run_folder(path: str | os.PathLike) -> RunFolder | None:
    """The RunFolder at `path`, or None when it is not one: a symbolic link, not a folder, or holding anything a run
    does not write (an empty folder included: nothing shows it was a run). Uses lstat only: never follows links."""
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        entries = list(os.scandir(path))
    except OSError:
        return None
    size, newest, temps, finished, trace_mtime, known = 0, 0.0, [], False, 0.0, False
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None
        newest = max(newest, st.st_mtime)
        if entry.name == "steps":
            if not stat.S_ISDIR(st.st_mode):
                return None
            inner = _scan_steps(Path(entry.path))
            if inner is None:
                return None
            inner_size, inner_newest, inner_temps = inner
            size, newest = size + inner_size, max(newest, inner_newest)
            temps += inner_temps
            known = True
        elif (entry.name in RUN_FILES or _BATCH_IMAGE.fullmatch(entry.name)) and stat.S_ISREG(st.st_mode):
            size += st.st_size
            known = True
            if entry.name == TRACE_FILE:
                finished, trace_mtime = True, st.st_mtime
        elif _TEMP_FILE.fullmatch(entry.name) and stat.S_ISREG(st.st_mode):
            size += st.st_size
            temps.append(Path(entry.path))
            known = True
        else:
            return None
    if not known:
        return None
    return RunFolder(path=path, finished=finished, mtime=trace_mtime if finished else newest, size=size,
                     temp_files=tuple(temps))


def _scan_steps(path: Path) -> tuple[int, float, list[Path]] | None:
    """(bytes, newest mtime, temporary files) of a run's steps/ folder, or None if it holds anything else."""
    size, newest, temps = 0, 0.0, []
    try:
        entries = list(os.scandir(path))
    except OSError:
        return None
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if _TEMP_FILE.fullmatch(entry.name):
            temps.append(Path(entry.path))
        elif not _STEP_FILE.fullmatch(entry.name):
            return None
        size += st.st_size
        newest = max(newest, st.st_mtime)
    return size, newest, temps


def run_folders(outputs_dir: str | os.PathLike) -> list[RunFolder]:
    """Every run folder directly under `outputs_dir` (finished or not), oldest first; foreign entries are left out."""
    try:
        entries = list(os.scandir(outputs_dir))
    except OSError:
        return []
    found = [scan_run_folder(e.path) for e in entries if not e.name.startswith(_DELETING)]
    return sorted((r for r in found if r is not None), key=lambda r: (r.mtime, r.path.name))


def remove_run_folder(path: str | os.PathLike) -> bool:
    """Delete a run folder (checked again with scan_run_folder); False when it is not one. It is renamed out of the
    way first, so a reader sees either the whole run or nothing."""
    path = Path(path)
    if scan_run_folder(path) is None:
        return False
    hidden = path.with_name(_DELETING + path.name)
    try:
        os.rename(path, hidden)
    except OSError as e:
        log.warning("cannot remove run %s: %s", path.name, e)
        return False
    shutil.rmtree(hidden, ignore_errors=True)  # rmtree never follows symbolic links
    return True


def prune_outputs(outputs_dir: str | os.PathLike, limits: Limits, keep: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Remove the oldest finished runs until at most limits.max_runs_kept remain and they take at most
    limits.max_output_bytes; returns the removed folders. Never removes the newest finished run, the folders in
    `keep` (runs on screen or in flight), unfinished folders (a run may be writing one: clean_orphans at start is
    their place), or anything that is not a run folder."""
    keep_names = {Path(k).name for k in keep}
    finished = [r for r in run_folders(outputs_dir) if r.finished]
    count, total = len(finished), sum(r.size for r in finished)
    removed = []
    for run in finished[:-1]:  # oldest first; the newest always stays
        if count <= limits.max_runs_kept and total <= limits.max_output_bytes:
            break
        if run.path.name in keep_names:
            continue
        if remove_run_folder(run.path):
            removed.append(run.path)
            count, total = count - 1, total - run.size
    if removed:
        log.info("outputs: removed %d old runs (%d kept, %.1f MB)", len(removed), count, total / 2**20)
    return removed


def clean_orphans(outputs_dir: str | os.PathLike, older_than: float = 0.0) -> list[Path]:
    """Remove what killed runs left in `outputs_dir`: run folders without a trace.json (and untouched for
    `older_than` seconds), half-removed folders, and temporary files of interrupted writes inside finished runs.
    Call it at start, before any run: an unfinished folder then belongs to no one. Returns what was removed."""
    removed: list[Path] = []
    now = time.time()
    for run in run_folders(outputs_dir):
        if not run.finished and now - run.mtime >= older_than:
            if remove_run_folder(run.path):
                removed.append(run.path)
        elif run.finished:
            for temp in run.temp_files:
                try:
                    temp.unlink()
                    removed.append(temp)
                except OSError:
                    pass
    try:
        leftovers = [Path(e.path) for e in os.scandir(outputs_dir) if e.name.startswith(_DELETING)]
    except OSError:
        leftovers = []
    for path in leftovers:  # a removal interrupted between its rename and its rmtree
        if scan_run_folder(path) is not None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("outputs: cleaned %d leftovers of interrupted runs", len(removed))
    return removed


EXPERIMENT_FILES = (".png", ".json")  # what an Explain-lab experiment folder holds


def prune_experiments(folder: str | os.PathLike, max_kept: int, keep: Iterable[str] = (),
                      only: Iterable[str] | None = None) -> list[Path]:
    """Keep the newest `max_kept` experiment folders under `folder` (outputs/explain): the oldest go first, except
    the folders named in `keep`; with `only`, only those named there may go. Only real folders holding nothing but
    PNG and JSON files are counted or removed; links and anything else stay."""
    folder = Path(folder)
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        try:
            if entry.name.startswith(_DELETING) or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            inner = list(os.scandir(entry.path))
            if all(f.is_file(follow_symlinks=False) and f.name.endswith(EXPERIMENT_FILES) for f in inner):
                found.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
        except OSError:
            continue
    removed = []
    keep, only = set(keep), None if only is None else set(only)
    excess = max(0, len(found) - max_kept)
    for _, name in sorted(found):
        if len(removed) >= excess:
            break
        if name in keep or (only is not None and name not in only):
            continue
        hidden = folder / (_DELETING + name)
        try:
            os.rename(folder / name, hidden)
        except OSError:
            continue
        shutil.rmtree(hidden, ignore_errors=True)
        removed.append(folder / name)
    return removed
