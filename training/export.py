"""Export the trained VAE, text encoder, UNet (EMA) and tokenizer as a stock StableDiffusionPipeline folder.

Also fits the latent -> RGB preview factors by least squares on the VAE and writes latent_preview.json.
Weights are stored as fp16 safetensors (the folder stays under 30 MB); configs ask for float32 on load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from pipelines.schedulers import make_scheduler
from shapes import world
from training.common import ASSET, CACHE, setup
from training.tokenizer import load as load_tokenizer
from training.train_unet import SCHEDULER_CONFIG, load_checkpoint
from training.train_vae import load_vae

KEEP = ("README.md", "EVAL.md", "samples.png", "preview_decoder.safetensors", "vocabulary.json")  # files that survive a re-export (refit the preview decoder with training.fit_preview after a new VAE)


@torch.no_grad()
def fit_preview(vae, n: int = 256, seed: int = 7) -> dict:
    """Least-squares rgb ~ latents @ W + b, latents as the UNet sees them (x scaling_factor), rgb in [-1, 1] at 16x16."""
    x = torch.from_numpy(world.batch(random.Random(seed), n)[0])
    latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    rgb = vae.decode(latents / vae.config.scaling_factor).sample
    f = x.shape[-1] // latents.shape[-1]
    rgb = torch.nn.functional.avg_pool2d(rgb.clamp(-1, 1), f)
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    a = torch.cat([z, torch.ones(len(z), 1)], 1)
    sol = torch.linalg.lstsq(a, y).solution  # (5, 3)
    mse = float(((a @ sol - y) ** 2).mean())
    return {"latent_rgb_factors": sol[:-1].tolist(), "latent_rgb_bias": sol[-1].tolist(), "fit_mse": mse}


# The model's own scheduler: chosen by measurement (EVAL.md, "Choosing the recommended settings").
SCHEDULER = "dpmpp_2m"


def build_pipeline(cache: Path = CACHE, ema: bool = True, tiny: bool = False,
                   scheduler_key: str = SCHEDULER) -> tuple[StableDiffusionPipeline, dict]:
    """The fp32 pipeline from the checkpoints in cache, with the recommended scheduler (tiny: smoke-test VAE)."""
    vae = load_vae(cache, tiny=tiny)
    te, unet, state = load_checkpoint(cache, ema=ema)
    vae.register_to_config(scaling_factor=float(state["scaling_factor"]))
    scheduler = make_scheduler(DDPMScheduler(**SCHEDULER_CONFIG), scheduler_key)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_tokenizer(cache / "tokenizer"), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, state


def export(pipe: StableDiffusionPipeline, dest: Path, meta: dict | None = None, tokenizer_dir: Path = CACHE / "tokenizer") -> Path:
    """Save pipe to dest atomically (fp16 weights, fp32 on load) with latent_preview.json; keep README/EVAL files."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent if dest.parent.exists() else None))
    preview = fit_preview(pipe.vae)
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.to(torch.float16)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        for m in (pipe.vae, pipe.text_encoder, pipe.unet):
            m.to(torch.float32)
    # transformers loads with dtype "auto" (the stored fp16) unless the config says otherwise; diffusers loads fp32.
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # vocab.json + merges.txt carry the same tokenizer; the 3.6 MB tokenizer.json would push the folder near 30 MB.
    (tmp / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(Path(tokenizer_dir) / name, tmp / "tokenizer" / name)
    fit_mse = preview.pop("fit_mse")
    old = dest / "latent_preview.json"
    if old.exists():  # a decision recorded beside the factors (offer_rgb false: the map is wrong on this VAE) stays
        kept = {k: v for k, v in json.loads(old.read_text()).items() if k in ("note", "offer_rgb")}
        preview = kept | preview
    (tmp / "latent_preview.json").write_text(json.dumps(preview, indent=2) + "\n")
    if meta is not None:
        (tmp / "training_meta.json").write_text(json.dumps(meta | {"latent_preview_fit_mse": fit_mse}, indent=2) + "\n")
    if dest.exists():
        for name in KEEP:
            if (dest / name).exists() and not (tmp / name).exists():
                shutil.copy2(dest / name, tmp / name)
    os.chmod(tmp, 0o755)
    for f in tmp.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)  # mkdtemp and safetensors write owner-only files
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--dest", type=Path, default=ASSET)
    p.add_argument("--scheduler", default=SCHEDULER, help="registry key of the model's own scheduler")
    a = p.parse_args()
    setup()
    pipe, state = build_pipeline(a.cache, scheduler_key=a.scheduler)
    meta = {"unet_step": state["step"], "train_minutes": round(state["elapsed"] / 60, 1),
            "final_loss": state["log"][-1]["loss"] if state["log"] else None,
            "scaling_factor": pipe.vae.config.scaling_factor, "objective": state.get("objective"),
            "init_from": state.get("init_from")}
    dest = export(pipe, a.dest, meta, tokenizer_dir=a.cache / "tokenizer")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"exported {dest} ({size / 2**20:.1f} MiB)", meta)


if __name__ == "__main__":
    main()
