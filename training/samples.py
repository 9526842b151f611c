"""The model card's samples.png: 32 prompts of the world (targets seed 5), seeds 0-31, at the recommended settings;
the first row names a background (one the object is not), since the model obeys one.

    python -m training.samples [--model assets/models/tiny-shapes] [--scale 3] [--steps 20]

Prints the prompts in grid order (row-major, 8 per row) for the caption in EVAL.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from shapes import world
from training import evaluate
from training.common import ASSET

FIRST_ROW_BACKGROUNDS = ["blue", "yellow", "white", "purple", "green", "orange", "black", "red"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ASSET)
    p.add_argument("--scale", type=float, default=3.0, help="the recommended guidance scale (pipelines/registry.py)")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    targets = evaluate.targets(32, seed=5)
    backgrounds = FIRST_ROW_BACKGROUNDS + [None] * (len(targets) - len(FIRST_ROW_BACKGROUNDS))
    prompts = [world.full_caption(*t, b if b != t[1] else None) for t, b in zip(targets, backgrounds)]
    images = evaluate.generate(pipe, prompts, list(range(len(prompts))), a.steps, a.scale)
    evaluate.grid(images, 8).save(a.model / "samples.png", optimize=True)
    print("; ".join(prompts))


if __name__ == "__main__":
    main()
