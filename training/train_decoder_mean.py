"""Fine-tune the VAE decoder so that the average of latents decodes to the average of the images (encoder frozen).

Why: the first x̂0 of a zero-terminal-SNR model is the mean of the latents its prompt allows (v-prediction at t = T
is -x0, and MSE makes it the conditional mean). A decoder trained only on single images decodes such an average to
whatever it makes of an off-manifold latent: measured on tiny-shapes, the decoded mean of 16 endings' latents had
6.7-7.8x the high-frequency energy of the endings' pixel mean (a green texture for a star whose endings were white,
brown, black and orange). Trained with this loss, it decodes the average to the blurry average a learner should see.

Loss per step: weighted reconstruction MSE of single renders (as train_vae, posterior samples) plus
--mean-weight x MSE between D(mean of a group's latent means) and the group's pixel mean. A group is --group renders
of one object that share some attributes (always the object's shape; colour, size and position each with
probability 1/2) on backgrounds drawn at random, as the endings of one prompt are. The encoder is frozen, so the
UNet's latents and the preview decoder's training data stay valid; reconstructions are checked before and after.

    python -m training.train_decoder_mean --minutes 12       # writes out/vae_decoder.pt (load_vae prefers it)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from shapes import world
from training.common import CACHE, lr_at, save_atomic, setup
from training.train_vae import evaluate, load_vae, object_crops


def group_renders(rng: random.Random, groups: int, size: int) -> torch.Tensor:
    """(groups * size, 3, 64, 64) renders in [-1, 1]: each group one object with shared attributes, varied rest."""
    images = []
    for _ in range(groups):
        shape = rng.choice(world.SHAPES)
        fixed = {"color": rng.choice(list(world.COLORS)), "size": rng.choice(list(world.SIZES)),
                 "cell": (rng.randrange(3), rng.randrange(3))}
        keep = {k: rng.random() < 0.5 for k in fixed}
        for _ in range(size):
            color = fixed["color"] if keep["color"] else rng.choice(list(world.COLORS))
            size_name = fixed["size"] if keep["size"] else rng.choice(list(world.SIZES))
            row, col = fixed["cell"] if keep["cell"] else (rng.randrange(3), rng.randrange(3))
            bg = rng.choice([c for c in world.COLORS if c != color])
            obj = world.make_obj(shape, color, size_name, row, col, rng)
            scene = world.Scene(bg, tuple(world.COLORS[bg]), (obj,))
            images.append(world.to_array(world.render(scene)))
    return torch.from_numpy(np.stack(images))


@torch.no_grad()
def mean_error(vae, seed: int, groups: int = 16, size: int = 8) -> float:
    """RMS (images in [0, 1]) between the decoded group mean latent and the group's pixel mean, on fresh groups."""
    vae.eval()
    x = group_renders(random.Random(seed), groups, size)
    z = vae.encode(x).latent_dist.mean
    zbar = z.view(groups, size, *z.shape[1:]).mean(1)
    decoded = vae.decode(zbar).sample.clamp(-1, 1)
    target = x.view(groups, size, 3, 64, 64).mean(1)
    return float(((decoded - target) / 2).pow(2).mean().sqrt())


def train(out: Path, minutes: float, steps: int, lr: float, mean_weight: float, group: int, groups: int,
          batch_size: int, seed: int, warmup: int = 50, tiny: bool = False) -> dict:
    """Fine-tune out/vae.pt's decoder (or out/vae_decoder.pt's) for `steps` or `minutes`; writes out/vae_decoder.pt."""
    vae = load_vae(out, tiny=tiny)  # the shipped VAE (or an earlier decoder fine-tune)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    before = {"reconstruction_mse": evaluate(vae, seed + 1), "mean_rms": mean_error(vae, seed + 2)}
    print("before", json.dumps(before), flush=True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    t0, step, log = time.time(), 0, []
    vae.train()
    while step < steps and time.time() - t0 < minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, steps)
        x, weight = object_crops(rng, batch_size, world.SIZE)
        xg = group_renders(rng, groups, group)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.sample()
            zg = vae.encode(xg).latent_dist.mean
            zg = zg.view(groups, group, *zg.shape[1:]).mean(1)
        rec = vae.decode(z).sample
        mse = (weight * (rec - x) ** 2).mean()
        mean_mse = (vae.decode(zg).sample - xg.view(groups, group, 3, 64, 64).mean(1)).pow(2).mean()
        loss = mse + mean_weight * mean_mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            log.append({"step": step, "mse": mse.item(), "mean_mse": mean_mse.item(), "t": round(time.time() - t0)})
            print(json.dumps(log[-1]), flush=True)
    after = {"reconstruction_mse": evaluate(vae, seed + 1), "mean_rms": mean_error(vae, seed + 2)}
    print("after", json.dumps(after), flush=True)
    save_atomic({"model": vae.state_dict(), "step": step, "log": log, "before": before, "after": after,
                 "recipe": {"lr": lr, "mean_weight": mean_weight, "group": group, "groups": groups,
                            "batch_size": batch_size}}, out / "vae_decoder.pt")
    return {"step": step, "before": before, "after": after}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CACHE)
    p.add_argument("--minutes", type=float, default=12)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--mean-weight", type=float, default=4.0)
    p.add_argument("--group", type=int, default=8, help="renders averaged per group")
    p.add_argument("--groups", type=int, default=4, help="groups per step")
    p.add_argument("--batch-size", type=int, default=24, help="single renders per step (reconstruction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    setup(a.threads)
    print(train(a.out, a.minutes, a.steps, a.lr, a.mean_weight, a.group, a.groups, a.batch_size, a.seed))


if __name__ == "__main__":
    main()
