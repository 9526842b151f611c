"""How strongly does each attribute word steer the UNet? A diagnostic for prompt adherence.

For pure-noise-like inputs x_t at several noise levels, compare the model's mean x̂0 (over many x_t) between two
prompts that differ in one attribute: colour ("red" vs "blue"), shape ("circle" vs "star"), size ("small" vs
"large"), position ("top left" vs "bottom right"). A model that obeys that word moves x̂0 in the cells it names; a
difference near 0 means the word is ignored (as position was, at chance, in the first exports). Prints the mean
|Δx̂0| per 3x3 cell of the latent and a one-number summary per attribute and noise level.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from training.common import ASSET, setup

PAIRS = {
    "color": ("a large red circle in the center", "a large blue circle in the center"),
    "shape": ("a large red circle in the center", "a large red star in the center"),
    "size": ("a small red circle in the center", "a large red circle in the center"),
    "position": ("a large red circle in the top left", "a large red circle in the bottom right"),
}


@torch.no_grad()
def response(pipe: StableDiffusionPipeline, t: int, a: str, b: str, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Mean over n noise draws x_t ~ N(0, I) of |x̂0(a) - x̂0(b)|, averaged over channels: (16, 16)."""
    x = torch.randn(n, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size,
                    generator=torch.Generator().manual_seed(seed))
    ac = pipe.scheduler.alphas_cumprod[t]
    means = []
    for prompt in (a, b):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0].expand(n, -1, -1)
        eps = pipe.unet(x, t, emb).sample
        means.append(((x - (1 - ac).sqrt() * eps) / ac.sqrt()).mean(0))
    return (means[0] - means[1]).abs().mean(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=ASSET)
    p.add_argument("-n", type=int, default=64)
    a = p.parse_args()
    setup()
    pipe = StableDiffusionPipeline.from_pretrained(a.model)
    print("mean |Δx̂0| (latent units) when one word changes; corner cells show where position words act")
    print("t     " + "  ".join(f"{k:>9}" for k in PAIRS) + "   position: top-left cell / bottom-right cell")
    for t in (999, 800, 600, 400):
        d = {k: response(pipe, t, *v, n=a.n) for k, v in PAIRS.items()}
        cells = torch.nn.functional.adaptive_avg_pool2d(d["position"][None, None], 3)[0, 0]
        print(f"{t:<5} " + "  ".join(f"{float(v.mean()):9.4f}" for v in d.values())
              + f"   {float(cells[0, 0]):.4f} / {float(cells[2, 2]):.4f}")


if __name__ == "__main__":
    main()
