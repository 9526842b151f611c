"""Rebuild the training cache from the shipped model, so training continues on a fresh machine without retraining.

The cache (~/.cache/tiny-shapes) lives outside the repo and is lost with the machine. The exported folder holds
everything needed to go on: the tokenizer, the VAE (the encoder makes the latents, the decoder is the fine-tuned one),
and the EMA weights of the text encoder and UNet. This writes them back as checkpoints in the layouts train_vae,
encode and train_unet read; the UNet checkpoint has no optimizer state, so train_unet re-warms the learning rate.
The weights were stored in fp16, so the restored model differs from the trained fp32 one by fp16 rounding (~1e-3 rel).

    python -m training.restore            # then: python -m training.encode -n 80000; python -m training.train_unet ...
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from training.common import ASSET, CACHE, save_atomic, setup
from training.train_unet import objective


def restore(src: Path = ASSET, out: Path = CACHE, force: bool = False) -> dict:
    """Write out/tokenizer, out/vae.pt (the shipped encoder + fine-tuned decoder) and out/unet.pt from the exported model folder src."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "unet.pt").exists() and not force:
        raise SystemExit(f"{out / 'unet.pt'} exists; it is newer than the shipped model or equal to it (use --force to replace it)")
    meta = json.loads((src / "training_meta.json").read_text()) if (src / "training_meta.json").exists() else {}
    tok = out / "tokenizer"
    shutil.rmtree(tok, ignore_errors=True)
    shutil.copytree(src / "tokenizer", tok)
    vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32)
    save_atomic({"model": vae.state_dict(), "restored_from": str(src)}, out / "vae.pt")  # load_vae falls back to it
    te = CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32).state_dict()
    unet = UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32).state_dict()
    # The objective the shipped weights were trained for, so train_unet resumes them instead of starting afresh.
    scheduler_config = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    step = int(meta.get("unet_step", 0))
    elapsed = 60.0 * float(meta.get("train_minutes", 0.0))
    save_atomic({"te": te, "unet": unet, "ema_te": te, "ema_unet": unet, "step": step, "elapsed": elapsed,
                 "log": [], "scaling_factor": float(vae.config.scaling_factor), "tiny": False,
                 "restored_from": str(src), "objective": objective(scheduler_config),
                 "init_from": meta.get("init_from")}, out / "unet.pt")
    return {"step": step, "elapsed_min": elapsed / 60, "scaling_factor": vae.config.scaling_factor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=ASSET)
    p.add_argument("--out", type=Path, default=CACHE)
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    setup()
    print(restore(a.src, a.out, a.force))


if __name__ == "__main__":
    main()
