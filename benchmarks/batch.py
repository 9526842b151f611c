"""A batch of N images in one batched run against N single runs, on the embedded model, measured in the same run.

    python -m benchmarks.batch [--images 4] [--steps 20] [--rounds 5]

Ours: generate() on the app's worker thread (pipelines/worker.py generate_here: the thread count measured for the
model, size and batch; the traced UNet), with the observer the CLI uses to write every step's previews of the first
image. The stock pipeline is timed the same way for reference (pipe(num_images_per_prompt=N, generator=[...]) against
N pipe() calls), as a user would otherwise batch. Medians over the rounds, batch and singles alternating; a ratio
below 1 is the batch's saving (goal: <= 0.7 for 4 images).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from pipelines.loading import ModelLoader
from pipelines.outputs import TraceWriter
from pipelines.registry import resolve
from pipelines.types import DEFAULT_MODEL, GenerationRequest
from pipelines.worker import GenerationWorker, generate_here

PROMPT = "a large red circle in the center"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    n = a.images
    loader = ModelLoader(device="cpu")
    worker = GenerationWorker()
    batch = GenerationRequest(prompt=PROMPT, num_inference_steps=a.steps, seed=0, num_images_per_prompt=n)
    singles = [batch.image_alone(0, i) for i in range(n)]

    def ours(requests: list[GenerationRequest]) -> None:
        for request in requests:
            with tempfile.TemporaryDirectory() as tmp:
                writer = TraceWriter(tmp, loader.previewer(request.model), {
                    "latents": ("latents", "fast"), "x0": ("denoised", "fast")})
                result = worker.run(lambda: generate_here(worker, request, writer, loader=loader))
                writer.finish(result)

    stock = StableDiffusionPipeline.from_pretrained(resolve(DEFAULT_MODEL))
    stock.set_progress_bar_config(disable=True)
    stock_threads = torch.get_num_threads()

    def stock_run(count: int, seeds: list[int]) -> None:
        torch.set_num_threads(stock_threads)  # the stock pipeline as a user runs it: torch's own thread count
        stock(PROMPT, num_inference_steps=a.steps, num_images_per_prompt=count,
              generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])

    cases = {
        "ours: batch": lambda: ours([batch]),
        "ours: singles": lambda: ours(singles),
        "stock: batch": lambda: stock_run(n, list(range(n))),
        "stock: singles": lambda: [stock_run(1, [i]) for i in range(n)],
    }
    for fn in cases.values():  # warm-up: load, trace, thread probe
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(a.rounds):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    m = {k: statistics.median(v) for k, v in times.items()}
    choice = loader.threads(DEFAULT_MODEL, None, None, serving=True, default=worker.default_threads, images=n)
    print(f"embedded model, {a.steps} steps, {n} images, {a.rounds} rounds (medians); our thread choice for the "
          f"batch: {choice.threads} ({choice.why})")
    print("| | batch of N s | N single runs s | ratio batch / singles |")
    print("|---|---|---|---|")
    for side in ("ours", "stock"):
        b, s = m[f"{side}: batch"], m[f"{side}: singles"]
        print(f"| {side} | {b:.2f} | {s:.2f} | {b / s:.2f}x |")
    worker.close()
    if worker.thread is not None:
        worker.thread.join()  # before the interpreter exits: a daemon thread in a torch op then aborts the process


if __name__ == "__main__":
    main()
