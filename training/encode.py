"""Pre-encode a large set of rendered scenes to VAE latents (posterior mean), keep the scenes for re-captioning.

Also fits the VAE scaling_factor (1 / std of the latents, as in SD) and stores it with the dataset.
"""

from __future__ import annotations

import argparse
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch

from shapes import world
from training.common import CACHE, setup
from training.train_vae import load_vae


@torch.no_grad()
def encode(vae, n: int, seed: int, chunk: int = 256) -> tuple[torch.Tensor, list[world.Scene]]:
    """n scenes -> unscaled latent means (n, 4, 16, 16) float16 and the scenes."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    out = torch.empty(n, vae.config.latent_channels, world.SIZE // 4, world.SIZE // 4, dtype=torch.float16)
    t0 = time.time()
    for i in range(0, n, chunk):
        x = torch.from_numpy(np.stack([world.to_array(world.render(s)) for s in scenes[i : i + chunk]]))
        out[i : i + chunk] = vae.encode(x).latent_dist.mean.half()
        if i % (chunk * 40) == 0:
            print(f"{i}/{n} {time.time() - t0:.0f}s", flush=True)
    return out, scenes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=CACHE)
    p.add_argument("-n", type=int, default=120_000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    setup()
    vae = load_vae(a.out)
    latents, scenes = encode(vae, a.n, a.seed)
    scaling_factor = float(1.0 / latents.float().std())
    print("latent mean", latents.float().mean((0, 2, 3)).tolist(), "std", latents.float().std().item(), "scaling_factor", scaling_factor)
    tmp = a.out / "latents.pt.tmp"
    torch.save({"latents": latents, "scaling_factor": scaling_factor, "seed": a.seed}, tmp)
    tmp.rename(a.out / "latents.pt")
    (a.out / "scenes.pkl").write_bytes(pickle.dumps(scenes))


if __name__ == "__main__":
    main()
