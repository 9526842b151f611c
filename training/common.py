"""Shared bits of the training scripts: cache folder, thread count, atomic checkpoints, LR schedule."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CACHE = Path(os.environ.get("TINY_SHAPES_CACHE", Path.home() / ".cache" / "tiny-shapes"))  # checkpoints + datasets, never in the repo
ASSET = Path(__file__).resolve().parent.parent / "assets" / "models" / "tiny-shapes"  # the exported model


def setup(threads: int = 2) -> None:
    """Offline hub, fixed thread count (the machine is shared)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temp file so a kill mid-write never leaves a broken checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, base_lr: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Linear warmup, then cosine decay to final_frac * base_lr at `total`, flat after."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))
