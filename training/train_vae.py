"""Train the f=4 AutoencoderKL (64x64x3 <-> 16x16x4) on rendered scenes; resumable, time-boxed."""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from shapes import world
from training.common import CACHE, lr_at, save_atomic, setup

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,  # 3 levels -> 2 downsamples -> factor 4
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)


def build_vae(tiny: bool = False) -> AutoencoderKL:
    """The VAE from its config; tiny=True for smoke tests."""
    cfg = dict(VAE_CONFIG)
    if tiny:
        cfg.update(block_out_channels=(8, 16, 16), norm_num_groups=4)
    return AutoencoderKL(**cfg)


OBJECT_WEIGHT = 4.0  # extra loss weight on object pixels: they are few, and their edges and colours carry every label


def pick_object(scene: world.Scene, rng: random.Random, small_weight: float = 1.0) -> world.Obj:
    """The object a training crop is centred on: any, or with small_weight > 1 the small one 7 times in 8 where the scene
    also has a large one (single-object scenes, 80%, are unaffected)."""
    smalls = [o for o in scene.objects if o.size == "small"]
    return rng.choice(smalls) if small_weight > 1 and smalls and rng.random() < 0.75 else rng.choice(scene.objects)


def object_crops(rng: random.Random, n: int, crop: int, small_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n renders cropped to crop x crop around a random object (+-crop/4 jitter), and per-pixel loss weights.

    Most of a 64x64 scene is flat background; crops around objects spend the compute on edges and colours.
    crop=64 returns full images. small_weight > 1 multiplies the object weight by it in crops centred on a small
    object (a small object is 3 latent pixels wide, and the first VAE lost its colour: yellow decoded as orange) and
    prefers the small object of a scene that has one of each size (pick_object).
    """
    images, _, scenes = world.batch(rng, n)
    bg = np.array([s.bg_rgb for s in scenes], np.float32)[:, :, None, None] / 127.5 - 1
    mask = np.abs(images - bg).max(1, keepdims=True) > 0.05
    weight = 1 + OBJECT_WEIGHT * mask
    if crop < world.SIZE:
        xs, ws = [], []
        for img, w, m, s in zip(images, weight, mask, scenes):
            o = pick_object(s, rng, small_weight)
            if o.size == "small":
                w = 1 + OBJECT_WEIGHT * small_weight * m
            j = crop // 4
            x0 = int(min(max(o.cx - crop / 2 + rng.uniform(-j, j), 0), world.SIZE - crop))
            y0 = int(min(max(o.cy - crop / 2 + rng.uniform(-j, j), 0), world.SIZE - crop))
            xs.append(img[:, y0 : y0 + crop, x0 : x0 + crop])
            ws.append(w[:, y0 : y0 + crop, x0 : x0 + crop])
        images, weight = np.stack(xs), np.stack(ws)
    return torch.from_numpy(images), torch.from_numpy(weight.astype(np.float32))


def train(out: Path, minutes: float, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int, tiny: bool = False, bf16: bool = False,
          crop: int = 32, decoder_only: bool = False, init: Path | None = None, anchor: float = 0.0,
          small_weight: float = 1.0, warmup: int = 200) -> dict:
    """Train until `steps` or `minutes` runs out; checkpoint to out/vae.pt; return final metrics.

    decoder_only: fine-tune the decoder of out/vae.pt with the encoder frozen (latents already encoded for the UNet
    stay valid); checkpoints to out/vae_decoder.pt, which load_vae prefers.
    init: start from this checkpoint's weights instead of random ones; out/vae.pt is resumed only when it is a
    refinement of the same init (so the old out/vae.pt may stay where it is).
    anchor: with init, add anchor * MSE between the new encoder's latent means and init's, so a UNet trained on
    init's latents stays close to valid and needs only a short fine-tune on the re-encoded ones.
    """
    ckpt = out / ("vae_decoder.pt" if decoder_only else "vae.pt")
    torch.manual_seed(seed)
    vae = build_vae(tiny)
    teacher = None
    if init is not None:
        vae.load_state_dict(torch.load(init, weights_only=False)["model"])
        if anchor > 0:
            teacher = copy.deepcopy(vae).requires_grad_(False).eval()
    if decoder_only:
        vae.load_state_dict(torch.load(out / "vae.pt", weights_only=False)["model"])
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    step, log = 0, []
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if state is not None and init is not None and state.get("init") != str(init):
        print(f"{ckpt} is not a refinement of {init}; starting from {init} and replacing it")
        state = None  # the documented workflow keeps the old out/vae.pt next to its copy passed as init
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resumed at step {step}")
    rng = random.Random(seed * 1000003 + step)  # a different stream after a resume, still seeded
    t0 = time.time()
    vae.train()
    while step < steps and time.time() - t0 < minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, steps)
        x, weight = object_crops(rng, batch_size, crop, small_weight)
        # bf16 autocast (CPU AMX): master weights and the loss stay fp32. Measured later on the UNet: its backward
        # ran ~20x slower than fp32's on this CPU, so it is off by default.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        mse = (weight * (rec.float() - x) ** 2).mean()
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = mse + kl_weight * kl
        if teacher is not None:
            with torch.no_grad():
                z0 = teacher.encode(x).latent_dist.mean
            loss = loss + anchor * (post.mean.float() - z0).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log.append({"step": step, "mse": mse.item(), "kl": kl.item(), "t": time.time() - t0})
            print(json.dumps(log[-1]), flush=True)
        if step % 250 == 0:
            save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "log": log, "init": init and str(init)}, ckpt)
    save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "log": log, "init": init and str(init)}, ckpt)
    return {"step": step, "mse": evaluate(vae, seed + 1)}


@torch.no_grad()
def evaluate(vae: AutoencoderKL, seed: int, n: int = 256) -> float:
    """Reconstruction MSE (posterior mean) on fresh scenes, images in [-1, 1]."""
    vae.eval()
    x = torch.from_numpy(world.batch(random.Random(seed), n)[0])
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return float(torch.nn.functional.mse_loss(rec, x))


def load_vae(out: Path = CACHE, tiny: bool = False) -> AutoencoderKL:
    """The trained VAE; with the fine-tuned decoder when out/vae_decoder.pt exists (same encoder)."""
    vae = build_vae(tiny)
    path = out / "vae_decoder.pt" if (out / "vae_decoder.pt").exists() else out / "vae.pt"
    vae.load_state_dict(torch.load(path, weights_only=False)["model"])
    return vae.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=CACHE)
    p.add_argument("--minutes", type=float, default=13)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU AMX)")
    p.add_argument("--crop", type=int, default=32, help="train on crops around objects; 64 = full images")
    p.add_argument("--decoder-only", action="store_true", help="fine-tune the decoder, encoder frozen")
    p.add_argument("--init", type=Path, help="start from this VAE checkpoint (e.g. a copy of the old out/vae.pt)")
    p.add_argument("--anchor", type=float, default=0.0, help="with --init: keep latents near init's (weight of their MSE)")
    p.add_argument("--small-weight", type=float, default=1.0, help="> 1: weight small objects' pixels by this and prefer them as crop centres")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    setup(a.threads)
    print(train(a.out, a.minutes, a.steps, a.batch_size, a.lr, a.kl_weight, a.seed, bf16=a.bf16, crop=a.crop,
                decoder_only=a.decoder_only, init=a.init, anchor=a.anchor, small_weight=a.small_weight, warmup=a.warmup))


if __name__ == "__main__":
    main()
