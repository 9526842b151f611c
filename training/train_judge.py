"""Train the shapes judge's shape classifier (shapes/judge.py ShapeNet) on rendered objects, and validate the judge.

    python -m training.train_judge --train       # writes shapes/judge_shape.safetensors
    python -m training.train_judge --validate    # accuracy per attribute on ground-truth renders
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy import ndimage

from shapes import world
from shapes.judge import WEIGHTS, Judge, ShapeNet, coverage, crop, validate


def _training_crops(rng: random.Random, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage crops of rendered single objects, degraded a little (blur, noise) to resemble generated images."""
    xs, ys = [], []
    for _ in range(n):
        s = world.sample_scene(rng, two_objects=False)
        arr = np.asarray(world.render(s)).astype(np.float32)
        if rng.random() < 0.5:
            arr = ndimage.gaussian_filter(arr, sigma=(rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), 0))
        arr = np.clip(arr + np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 8), arr.shape), 0, 255)
        cov = coverage(arr.astype(np.uint8))
        if cov is None:
            continue
        xs.append(crop(cov[0]))
        ys.append(world.SHAPES.index(s.objects[0].shape))
    return np.stack(xs).astype(np.float32), np.array(ys)


def train_classifier(n: int = 20000, epochs: int = 6, seed: int = 0, out: Path = WEIGHTS) -> float:
    """Fit ShapeNet on rendered objects; returns held-out accuracy on clean renders."""
    torch.manual_seed(seed)
    x, y = _training_crops(random.Random(seed), n)
    x, y = torch.from_numpy(x)[:, None], torch.from_numpy(y)
    net = ShapeNet()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for ep in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {ep} loss {loss.item():.3f}", flush=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return validate(Judge(out), 1000, seed + 12345)["all"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true")
    p.add_argument("--validate", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    if a.train:
        print("held-out accuracy (all attributes)", train_classifier())
    if a.validate or not a.train:
        print(validate(Judge()))


if __name__ == "__main__":
    main()
