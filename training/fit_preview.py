"""Fit the tiny preview decoder of a model folder on latents the model itself generates.

    python -m training.fit_preview --model assets/models/tiny-shapes

1. Generate: `pipelines.generate.generate` over seeded prompts of the shapes world, under several schedulers,
   guidance scales and step counts; keep the final latents, the last step's x̂0 and a few random steps'
   latents and x̂0 (what a live preview is shown).
2. Targets: the real VAE decode of exactly those latents, clamped to [-1, 1].
3. Fit `pipelines.previews.PreviewDecoder` (L1 + MSE in pixel space plus L1 of the per-latent-cell mean
   colours, the cells of drawn objects weighted up; Adam, cosine LR, seeded shuffles), then write
   `preview_decoder.safetensors` (fp16, config in the file's metadata) into the folder.

Every random choice is seeded and the script runs on one thread, so a rerun writes the same weights. The
prompts use seeds from FIT_SEED_BASE up; tests/test_preview_fidelity.py holds out other seeds and prompts.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.families import family_of
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.previews import (
    DECODER_FILE,
    PreviewDecoder,
    PreviewDecoderConfig,
    OBJECT_THRESHOLD,
    colour_error,
    image_to_uint8,
    object_colour_error,
    save_preview_decoder,
)
from pipelines.types import GenerationRequest
from shapes import world
from training.common import ASSET

FIT_SEED_BASE = 100_000  # image seeds of the fit set: run i uses FIT_SEED_BASE + i (the tests use seeds < 10,000)
# None: the model's own (v2, zero SNR: no Heun or Karras). The shipped decoder's fit set also drew "lcm" (after
# "unipc"); since issue 23 LCM is refused on this model (not consistency-distilled), so a refit draws from these 7.
SCHEDULERS = (None, None, "euler", "euler_a", "ddim", "unipc", "ddpm")
GUIDANCE = (1.0, 3.0, 5.0, 5.0, 7.5, 12.0)
STEPS = (10, 20, 20, 30)
RANDOM_STEPS = 4  # intermediate steps kept per run, each with its latents and its x̂0


def collect(loader: ModelLoader, model: str, runs: int, seed: int) -> torch.Tensor:
    """Model-space latents (N, C, h, w) from `runs` seeded generations: final, last x̂0, random steps."""
    rng = random.Random(seed)
    kept: list[torch.Tensor] = []
    for i in range(runs):
        scene = world.sample_scene(rng)
        prompt = world.caption(scene, rng, p_empty=0.05)
        request = GenerationRequest(prompt, model=model, scheduler=rng.choice(SCHEDULERS),
                                    guidance_scale=rng.choice(GUIDANCE), num_inference_steps=rng.choice(STEPS),
                                    seed=FIT_SEED_BASE + i)
        observer = CollectingObserver()
        result = generate(request, observer, loader=loader)
        events = observer.events
        kept += [result.latents[:1], events[-1].denoised[:1]]
        for e in rng.sample(events[:-1], min(RANDOM_STEPS, len(events) - 1)):
            kept += [e.latents[:1], e.denoised[:1]]
    return torch.cat(kept).float()


@torch.no_grad()
def decode_targets(pipe, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The real VAE decode of model-space latents (N, C, h, w) -> (N, 3, H, W) in [-1, 1], clamped."""
    family = family_of(pipe)
    out = [family.decode(pipe, latents[i:i + batch]).clamp(-1, 1) for i in range(0, len(latents), batch)]
    return torch.cat(out)


def object_cells(targets: torch.Tensor, cell: int) -> torch.Tensor:
    """(N, 1, h, w) 1.0 on the latent cells whose mean colour is away from the image's background (its median
    cell colour), as pipelines.previews.object_colour_error marks them; 0.0 elsewhere."""
    pooled = (F.avg_pool2d(targets, cell) + 1) / 2  # [0, 1]
    background = pooled.flatten(2).median(dim=2).values[:, :, None, None]
    return ((pooled - background).abs().sum(1, keepdim=True) > OBJECT_THRESHOLD).float()


def fit(latents: torch.Tensor, targets: torch.Tensor, config: PreviewDecoderConfig, epochs: int, seed: int,
        batch: int = 64, lr: float = 3e-3, object_weight: float = 0.0) -> PreviewDecoder:
    """Adam on L1 + MSE in pixel space ([-1, 1]) + L1 of cell means, cosine LR to 5% over `epochs` passes.

    object_weight: extra weight of the cells of drawn objects in every term. Small shapes cover ~5% of an image,
    so an unweighted fit spends its capacity on the background and gets objects' colours wrong (a red star
    previewed green)."""
    torch.manual_seed(seed)
    model = PreviewDecoder(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(latents)
    total = epochs * math.ceil(n / batch)
    step = 0
    gen = torch.Generator().manual_seed(seed)
    objects = object_cells(targets, config.scale)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for k in range(0, n, batch):
            idx = order[k:k + batch]
            for g in opt.param_groups:
                g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))
            pred = model(latents[idx])
            target = targets[idx]
            cells = 1.0 + object_weight * objects[idx]  # (B, 1, h, w)
            pixels = F.interpolate(cells, scale_factor=config.scale, mode="nearest")
            # The pooled term weighs what a preview is judged on: each latent cell's colour.
            diff = pred - target
            pooled = F.avg_pool2d(pred, config.scale) - F.avg_pool2d(target, config.scale)
            loss = ((diff.abs() * pixels).mean() + (diff.square() * pixels).mean()
                    + (pooled.abs() * cells).mean()) / cells.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            step += 1
        print(f"epoch {epoch + 1}/{epochs}: loss {running / n:.4f}", flush=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSET, help="diffusers model folder; the decoder is written there")
    p.add_argument("--runs", type=int, default=600, help="generations to collect latents from")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", type=int, default=64, help="hidden channels of the decoder")
    p.add_argument("--layers", type=int, default=6, help="3x3 convolutions of the decoder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--object-weight", type=float, default=8.0, help="extra loss weight of the cells of drawn objects")
    p.add_argument("--out", type=Path, default=None, help="write the decoder here instead of into the model folder")
    p.add_argument("--cache", type=Path, default=None,
                   help="latents file: read if it exists (same --runs and --seed), else collected and written there")
    p.add_argument("--dry-run", action="store_true", help="fit and report, do not write the decoder")
    a = p.parse_args()
    torch.set_num_threads(1)  # the machine is shared; one thread also keeps the fit bit-for-bit repeatable
    torch.use_deterministic_algorithms(True)

    loader = ModelLoader(device="cpu")
    model_key = str(a.model.resolve())
    pipe = loader.get(model_key)
    t0 = time.perf_counter()
    if a.cache is not None and a.cache.is_file():
        latents = torch.load(a.cache)
    else:
        latents = collect(loader, model_key, a.runs, a.seed)
        if a.cache is not None:
            a.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latents, a.cache)
    targets = decode_targets(pipe, latents)
    print(f"collected {len(latents)} latents from {a.runs} runs in {time.perf_counter() - t0:.0f} s", flush=True)

    # Hold out every 10th sample to report an honest fit error.
    held = torch.arange(len(latents)) % 10 == 0
    config = PreviewDecoderConfig(latent_channels=latents.shape[1], hidden=a.hidden, layers=a.layers,
                                  scale=pipe.vae_scale_factor)
    t1 = time.perf_counter()
    decoder = fit(latents[~held], targets[~held], config, a.epochs, a.seed, object_weight=a.object_weight)
    print(f"fitted {sum(p.numel() for p in decoder.parameters())} parameters in {time.perf_counter() - t1:.0f} s")
    with torch.no_grad():
        pred = decoder(latents[held])
    reference = targets[held]
    err = np.array([colour_error(image_to_uint8(pred[i]), image_to_uint8(reference[i]), config.scale)
                    for i in range(len(pred))])
    print(f"held-out colour error (mean |RGB| in [0,1] on the latent grid): mean {err.mean():.4f}, "
          f"p95 {np.quantile(err, 0.95):.4f}, max {err.max():.4f}")
    obj = [object_colour_error(image_to_uint8(pred[i]), image_to_uint8(reference[i]), config.scale)
           for i in range(len(pred))]
    obj = np.array([e for e in obj if e is not None])
    print(f"held-out object colour error (the same, on the cells of drawn objects): mean {obj.mean():.4f}, "
          f"p95 {np.quantile(obj, 0.95):.4f}, max {obj.max():.4f}")
    if not a.dry_run:
        path = save_preview_decoder(decoder, a.out or a.model / DECODER_FILE)
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
