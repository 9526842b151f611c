"""The CLI (`python -m pipelines generate`, full trace: x_t and decoded x̂0 written every step) against what a user
would otherwise run: the stock StableDiffusionPipeline in a fresh process with default settings (torch's own thread
count, OMP_NUM_THREADS removed), on the embedded model and on an SD-shaped ~17 M-parameter UNet at 128x128.

    python -m benchmarks.cli_vs_stock [--rounds 3] [--steps 30]

Both sides are whole processes, run alternately; the figures are medians over the rounds. "run" is the time from
the loaded pipeline to the image on disk (the stock side: pipe(...) plus image.save; ours: generate() with every
step's previews plus trace.json and image.png, the CLI's 'written in'), "process" is the whole command (load and
our thread probe included). Ratios are ours / stock (1.00 = as fast as stock). Our thread choice is kept on disk
(pipelines/threads.py), here in a file of the run's own: the first process of each model measures it ("first
process" column), later ones read it, as a user's second run does.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # the parent only builds the 17M UNet's folder; every timing runs in a fresh process
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "assets" / "models" / "tiny-shapes"
PROMPT = "a large red circle in the center"

STOCK = r"""
import sys, time
import torch
from diffusers import StableDiffusionPipeline
folder, steps, scale, size, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pipe = StableDiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
t = time.perf_counter()
image = pipe(sys.argv[6], num_inference_steps=steps, guidance_scale=scale, height=size, width=size,
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save(out)
print(f"RUN {time.perf_counter() - t:.4f} THREADS {torch.get_num_threads()}")
"""


def mid_unet_folder(dest: Path) -> Path:
    """The embedded model with its UNet replaced by an SD-shaped one of ~17 M parameters (random weights: speed
    does not depend on them), 128x128 images from 32x32 latents."""
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 256), attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=pipe.text_encoder.config.hidden_size,
    )
    pipe.unet = unet
    pipe.register_modules(unet=unet)
    pipe.save_pretrained(dest)
    for name in ("latent_preview.json", "preview_decoder.safetensors"):  # same VAE: the same previews fit
        (dest / name).write_bytes((EMBEDDED / name).read_bytes())
    return dest


THREAD_CACHE: dict[str, str] = {}  # set in main(): our side's thread cache file, fresh for this run


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own choice, as a user has it
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)} | THREAD_CACHE


def stock(folder: Path, steps: int, scale: float, size: int, out: Path) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STOCK, str(folder), str(steps), str(scale), str(size), str(out), PROMPT],
                          env=_env(), capture_output=True, text=True, check=True)
    whole = time.perf_counter() - t
    return float(re.search(r"RUN ([\d.]+)", proc.stdout).group(1)), whole


def ours(folder: Path, steps: int, scale: float, size: int, out: Path) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines", "generate", "--model", str(folder), "--prompt", PROMPT,
                           "--steps", str(steps), "--guidance-scale", str(scale), "--width", str(size), "--height",
                           str(size), "--seed", "0", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
    whole = time.perf_counter() - t
    return float(re.search(r"written in ([\d.]+)s", proc.stdout).group(1)), whole


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scale", type=float, default=7.5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        THREAD_CACHE["PLAYGROUND_THREAD_CACHE"] = str(tmp / "threads.json")
        cases = {"embedded 64²": (EMBEDDED, 64), "SD-shaped 17M UNet 128²": (mid_unet_folder(tmp / "mid"), 128)}
        mid = UNet2DConditionModel.from_pretrained(tmp / "mid" / "unet")
        print(f"SD-shaped UNet: {sum(p.numel() for p in mid.parameters()) / 1e6:.1f} M parameters")
        print(f"{a.steps} steps, CFG {a.scale:g}, {a.rounds} rounds, each side a fresh process, alternating")
        print("| model | stock run s | ours run s | run ratio | stock process s | ours process s | process ratio "
              "| ours first process s (thread probe) |")
        print("|---|---|---|---|---|---|---|---|")
        for name, (folder, size) in cases.items():
            s_run, o_run, s_all, o_all = [], [], [], []
            for r in range(a.rounds):
                sr, sa = stock(folder, a.steps, a.scale, size, tmp / f"stock{r}.png")
                orun, oa = ours(folder, a.steps, a.scale, size, tmp / f"ours{r}")
                s_run.append(sr), o_run.append(orun), s_all.append(sa), o_all.append(oa)
            m = statistics.median
            print(f"| {name} | {m(s_run):.2f} | {m(o_run):.2f} | {m(o_run) / m(s_run):.2f}x | {m(s_all):.2f} | "
                  f"{m(o_all):.2f} | {m(o_all) / m(s_all):.2f}x | {o_all[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
