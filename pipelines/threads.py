"""torch's thread count for a model at a size, chosen by measurement: one denoiser call at 1 and at N threads.

A parameter threshold cannot say it: the embedded model (3 M parameters, 16x16 latents) runs fastest on one thread
(a convolution that small does not split over cores: 0.41-0.45 s per 20-step run against 0.50 s on two), a 17 M
SD-shaped UNet at 128x128 ran 1.7x slower on one thread than stock diffusers on two. So on first use of a model and
latent size on a CPU, `choose` times one batched (CFG) denoiser call at each count and keeps the answer (the loader
caches it with the model).

serving: in the web app the event loop and the preview renderer need a core while the loop runs, and a second
OpenMP thread that stalls at every op's barrier there cost the embedded model 2.2x (issue 12). There N threads must
beat one by SERVING_MARGIN; in a plain process (the CLI) by CLI_MARGIN.

The answer is also kept on disk (ThreadCache: $XDG_CACHE_HOME or ~/.cache, diffusion-playground/threads.json, keyed
by the denoiser's architecture, dtype, latent size, setting, core count and torch version), so a CLI process does not
pay the probe again (0.2 s of the embedded model's 0.6 s run). PLAYGROUND_THREAD_CACHE=off (or a file path) changes
that; entries older than CACHE_DAYS are measured again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SERVING_MARGIN = 1.5  # N threads must be this much faster than one to take a core from a serving process
CLI_MARGIN = 1.2  # ... and this much in a plain process: a 3-call probe on a shared CPU varies by 5-15%, and
# a tiny UNet whose two threads only tie with one must not flip between runs (the 17M UNet at 128² wins by 1.7x)
LARGE_CALL_SECONDS = 0.1  # a first call this slow on one thread is a model big enough to split: no further probe
# (the embedded model's first call takes 0.02-0.03 s, the 17M UNet's at 128² 0.19 s; the full probe cost that one
# 1.2 s, a third of its 30-step run, in every CLI process)
CACHE_DAYS = 7  # a cached choice older than this is measured again (a new torch or machine has its own key anyway)


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count for one model, latent size and setting, and the probe it came from."""

    threads: int  # torch intra-op threads to run with
    seconds: dict[int, float]  # fastest of the probe's calls at each thread count tried (empty: not probed)
    why: str  # one line: what decided it


def probe_inputs(denoiser, latent_hw: tuple[int, int], images: int = 1) -> dict | None:
    """Inputs of one CFG-batched call of an SD-shaped UNet for `images` images (batch 2 x images), or None for
    denoisers the probe cannot feed (transformers, UNets with added conditioning such as SDXL's)."""
    cfg = getattr(denoiser, "config", None)
    if cfg is None or type(denoiser).__name__ != "UNet2DConditionModel" or cfg.get("addition_embed_type") is not None:
        return None
    if cfg.get("class_embed_type") is not None or cfg.get("time_cond_proj_dim") is not None:
        return None
    g = torch.Generator("cpu").manual_seed(0)
    dtype = next(denoiser.parameters()).dtype
    h, w = latent_hw
    return {"sample": torch.randn(2 * images, cfg.in_channels, h, w, generator=g).to(dtype),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(2 * images, 77, cfg.cross_attention_dim, generator=g).to(dtype)}


@torch.no_grad()
def time_calls(denoiser, inputs: dict, counts: tuple[int, ...], rounds: int = 3) -> dict[int, float]:
    """Fastest of `rounds` denoiser calls at each thread count in `counts`, after one warm-up call at each. The counts
    alternate call by call, so a burst of load from another process slows both sides instead of deciding the race
    (one count timed after the other flipped the embedded model's choice in one process of six)."""
    before = torch.get_num_threads()
    best = {n: float("inf") for n in counts}
    try:
        for n in counts:
            torch.set_num_threads(n)
            denoiser(**inputs)
        for _ in range(rounds):
            for n in counts:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                denoiser(**inputs)
                best[n] = min(best[n], time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def first_call(denoiser, inputs: dict) -> float:
    """Seconds of one call on one thread (the model's first: it pays allocation too, so it errs toward 'large')."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        denoiser(**inputs)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def choose(denoiser, latent_hw: tuple[int, int], device: torch.device, default: int, serving: bool,
           images: int = 1) -> ThreadChoice:
    """The thread count for `denoiser` at `latent_hw` for a batch of `images` on `device` (default: torch's own
    count, N): a batch is more work per call, which more threads may split where one image's call does not."""
    if device.type != "cpu" or default <= 1:
        return ThreadChoice(default, {}, "not a multi-core CPU: torch's own count")
    inputs = probe_inputs(denoiser, latent_hw, images)
    if inputs is None:
        return ThreadChoice(default, {}, "no probe for this denoiser: torch's own count")
    # One thread first: a small model's call is milliseconds there, and a second thread that has to share its core
    # with another process can be 20x slower (tests/conftest.py), which must not read as "large".
    one = first_call(denoiser, inputs)
    if one > LARGE_CALL_SECONDS:
        return ThreadChoice(default, {1: one}, f"one call takes {one:.2f} s on one thread: large enough to split")
    timed = time_calls(denoiser, inputs, (1, default))
    one, many = timed[1], timed[default]
    margin = SERVING_MARGIN if serving else CLI_MARGIN
    threads = default if one >= margin * many else 1
    return ThreadChoice(threads, {1: one, default: many},
                        f"1 thread {one * 1e3:.1f} ms, {default} threads {many * 1e3:.1f} ms per call; "
                        f"{default} must win by {margin:g}x{' while serving' if serving else ''}")


class ThreadCache:
    """Thread choices measured earlier on this machine, in one JSON file. Unreadable or stale entries count as
    missing; a failed write only costs the next process its probe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: keep nothing

    @classmethod
    def default(cls) -> "ThreadCache":
        """PLAYGROUND_THREAD_CACHE: unset for ~/.cache/diffusion-playground/threads.json, 'off' (or '') for none,
        else a file path."""
        setting = os.environ.get("PLAYGROUND_THREAD_CACHE")
        if setting is not None:
            return cls(None if setting.strip().lower() in ("", "off", "0", "no") else Path(setting))
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return cls(Path(cache) / "diffusion-playground" / "threads.json")

    @staticmethod
    def key(denoiser, latent_hw: tuple[int, int], default: int, serving: bool, images: int = 1) -> str:
        """What the measurement depends on: the architecture (config, not weights), dtype, size, setting, the CPU
        and torch. A digest: stable across processes (no salted hash())."""
        cfg = dict(getattr(denoiser, "config", {}) or {})
        cfg.pop("_name_or_path", None)
        cfg.pop("_diffusers_version", None)
        dtype = next(denoiser.parameters()).dtype
        what = json.dumps([type(denoiser).__name__, cfg, str(dtype), list(latent_hw), images, default, serving,
                           os.cpu_count(), platform.machine(), platform.processor(), torch.__version__],
                          sort_keys=True, default=str)
        return hashlib.sha256(what.encode()).hexdigest()[:32]

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> ThreadChoice | None:
        if self.path is None:
            return None
        entry = self._read().get(key)
        try:
            if time.time() - float(entry["at"]) > CACHE_DAYS * 86400:
                return None
            seconds = {int(n): float(s) for n, s in entry["seconds"].items()}
            return ThreadChoice(int(entry["threads"]), seconds, f"{entry['why']} (measured earlier on this machine)")
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def put(self, key: str, choice: ThreadChoice) -> None:
        # Only a side-by-side comparison is kept: the one-call shortcut (LARGE_CALL_SECONDS) reads a single first call,
        # which a busy machine slows past the mark (the embedded model's batch of 4 read 0.21 s under load and kept
        # 2 threads, 0.72x of four single runs, against 0.59x on its measured 1 thread).
        if self.path is None or len(choice.seconds) < 2:
            return
        data = self._read()
        data[key] = asdict(choice) | {"at": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".threads-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError:
            pass


def choose_cached(denoiser, latent_hw: tuple[int, int], device: torch.device, default: int, serving: bool,
                  cache: ThreadCache, images: int = 1) -> ThreadChoice:
    """`choose`, answered from `cache` when this machine measured the same denoiser, size and setting before."""
    if device.type != "cpu" or default <= 1 or probe_inputs(denoiser, latent_hw) is None:
        return choose(denoiser, latent_hw, device, default, serving, images)
    key = cache.key(denoiser, latent_hw, default, serving, images)
    found = cache.get(key)
    if found is not None:
        return found
    choice = choose(denoiser, latent_hw, device, default, serving, images)
    cache.put(key, choice)
    return choice
