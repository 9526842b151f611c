"""Overhead of our observable loop against the stock diffusers pipeline, measured in the same run.

    python -m benchmarks.core_overhead [--model tiny-shapes] [--steps 20] [--repeats 5]

Prints per-configuration median seconds and the ratio ours / stock (1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import diffusers
import torch

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver, Observer
from pipelines.previews import Previewer
from pipelines.schedulers import make_scheduler
from pipelines.types import GenerationRequest, StepEvent


class PreviewingObserver(Observer):
    """What the UI does per step: render the latent→RGB (or channel) preview of x_t and x̂0."""

    def __init__(self, previewer: Previewer) -> None:
        self.previewer = previewer
        self.kind = "rgb" if "rgb" in previewer.kinds else "channels"

    def on_step(self, event: StepEvent) -> None:
        self.previewer.render(self.kind, event.latents)
        self.previewer.render(self.kind, event.denoised)


def median_times(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median seconds per function, run round-robin so background load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shapes")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()

    diffusers.utils.logging.disable_progress_bar()
    loader = ModelLoader()
    pipe, _ = loader.view(args.model, args.scheduler)
    stock = loader.get(args.model)
    stock.scheduler = make_scheduler(stock.scheduler, args.scheduler)
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompt = "a large red star in the top left on a white background"
    request = GenerationRequest(prompt, model=args.model, scheduler=args.scheduler, num_inference_steps=args.steps,
                                guidance_scale=args.guidance_scale, seed=0, width=size, height=size)

    def run_stock():
        stock(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, width=size, height=size,
              generator=torch.Generator("cpu").manual_seed(0))

    previewer = Previewer(pipe)
    rows = list(median_times({
        "stock pipeline __call__": run_stock,
        "generate(), no observer": lambda: generate(request, loader=loader),
        "generate(), collecting events": lambda: generate(request, CollectingObserver(), loader=loader),
        "generate(), rendering previews": lambda: generate(request, PreviewingObserver(previewer), loader=loader),
    }, args.repeats).items())
    base = rows[0][1]
    print(f"model {args.model}, {size}x{size}, {args.steps} steps, {args.scheduler}, CFG {args.guidance_scale}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, seconds in rows:
        print(f"  {name:32} {seconds * 1000:8.1f} ms   ratio {seconds / base:5.2f}")


if __name__ == "__main__":
    main()
