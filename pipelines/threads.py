"""torch's thread count for a model at a size, chosen by measurement: one denoiser call at 1 and at N threads.

A parameter threshold cannot say it: the embedded model (3 M parameters, 16x16 latents) runs fastest on one thread
(a convolution that small does not split over cores: 0.41-0.45 s per 20-step run against 0.50 s on two), a 17 M
SD-shaped UNet at 128x128 ran 1.7x slower on one thread than stock diffusers on two. So on first use of a model and
latent size on a CPU, `choose` times one batched (CFG) denoiser call at each count and keeps the answer (the loader
caches it with the model).

serving: in the web app the event loop and the preview renderer need a core while the loop runs, and a second
OpenMP thread that stalls at every op's barrier there cost the embedded model 2.2x (issue 12). There N threads must
beat one by SERVING_MARGIN; in a plain process (the CLI) by CLI_MARGIN.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

SERVING_MARGIN = 1.5  # N threads must be this much faster than one to take a core from a serving process
CLI_MARGIN = 1.2  # ... and this much in a plain process: a 3-call probe on a shared CPU varies by 5-15%, and
# a tiny UNet whose two threads only tie with one must not flip between runs (the 17M UNet at 128² wins by 1.7x)
LARGE_CALL_SECONDS = 0.5  # a first call this slow on one thread is a model big enough to split: no further probe


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count for one model, latent size and setting, and the probe it came from."""

    threads: int  # torch intra-op threads to run with
    seconds: dict[int, float]  # fastest of the probe's calls at each thread count tried (empty: not probed)
    why: str  # one line: what decided it


def probe_inputs(denoiser, latent_hw: tuple[int, int]) -> dict | None:
    """Inputs of one CFG-batched call of an SD-shaped UNet (batch 2), or None for denoisers the probe cannot feed
    (transformers, UNets with added conditioning such as SDXL's)."""
    cfg = getattr(denoiser, "config", None)
    if cfg is None or type(denoiser).__name__ != "UNet2DConditionModel" or cfg.get("addition_embed_type") is not None:
        return None
    if cfg.get("class_embed_type") is not None or cfg.get("time_cond_proj_dim") is not None:
        return None
    g = torch.Generator("cpu").manual_seed(0)
    dtype = next(denoiser.parameters()).dtype
    h, w = latent_hw
    return {"sample": torch.randn(2, cfg.in_channels, h, w, generator=g).to(dtype),
            "timestep": torch.tensor(500),
            "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(dtype)}


@torch.no_grad()
def time_call(denoiser, inputs: dict, threads: int, calls: int = 3, give_up: float = float("inf")) -> float:
    """Fastest of `calls` denoiser calls at `threads` threads, after one warm-up call; just the warm-up's time when
    that took longer than `give_up` seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        denoiser(**inputs)
        first = time.perf_counter() - t0
        if first > give_up:
            return first
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            denoiser(**inputs)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(before)


def choose(denoiser, latent_hw: tuple[int, int], device: torch.device, default: int, serving: bool) -> ThreadChoice:
    """The thread count for `denoiser` at `latent_hw` on `device` (default: torch's own count, N)."""
    if device.type != "cpu" or default <= 1:
        return ThreadChoice(default, {}, "not a multi-core CPU: torch's own count")
    inputs = probe_inputs(denoiser, latent_hw)
    if inputs is None:
        return ThreadChoice(default, {}, "no probe for this denoiser: torch's own count")
    # One thread first: a small model's call is milliseconds there, and a second thread that has to share its core
    # with another process can be 20x slower (tests/conftest.py), which must not read as "large".
    one = time_call(denoiser, inputs, 1, give_up=LARGE_CALL_SECONDS)
    if one > LARGE_CALL_SECONDS:
        return ThreadChoice(default, {1: one}, f"one call takes {one:.2f} s on one thread: large enough to split")
    many = time_call(denoiser, inputs, default)
    margin = SERVING_MARGIN if serving else CLI_MARGIN
    threads = default if one >= margin * many else 1
    return ThreadChoice(threads, {1: one, default: many},
                        f"1 thread {one * 1e3:.1f} ms, {default} threads {many * 1e3:.1f} ms per call; "
                        f"{default} must win by {margin:g}x{' while serving' if serving else ''}")
