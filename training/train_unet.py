"""Train the CLIP text encoder and the UNet jointly on pre-encoded latents.

v2 (shipped): v-prediction on SD's noise schedule rescaled to zero terminal SNR, sampled with "trailing" timesteps
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891). On v1's schedule
the last timestep kept sqrt(alpha_bar_T) = 0.068 of the image, so x_T carried the training image's lowest frequencies
and the model read the background from the noise instead of the prompt; and epsilon prediction made the first x̂0
= (x_T - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) amplify eps errors ~14x into speckle. At zero SNR, v at t = T is
-x0, so the MSE-optimal first prediction is the mean of the images the prompt allows: the blurry average.

A checkpoint trained for another objective (v1's epsilon, e.g. one written by training.restore from the v1 export)
is used as the initial weights of a new run: step, clock, log and optimizer start fresh.

Recipe: captions re-drawn from each scene every time it is seen (10% empty, for CFG; the background named with
probability --p-background), uniform timesteps (optionally a share of each batch from high noise, --high-t-frac),
MSE on the prediction target with loss weight 1 (the default; for v this is the x0 error weighted (1 + SNR), which
keeps weight 1 on x0 at t = T), Min-SNR (--min-snr-gamma, Hang et al. 2023, arXiv:2303.09556; for v the weight is
max(min(SNR, gamma), 1) / (SNR + 1), floored so t = T still learns) or v1's 1 + min(1/SNR, cap) on epsilon
(--noisy-weight). AdamW with warmup + cosine decay over a wall-clock budget, EMA
weights, fp32 (bf16 autocast's backward was ~20x slower on this CPU). Resumable: checkpoints hold model, EMA,
optimizer, RNG streams, elapsed time; Ctrl-C or `kill` saves one. On a machine without the cache,
`python -m training.restore` rebuilds it from the shipped model.

v1's recipe (epsilon, scaled_linear, 405 min from scratch with --noisy-weight 8) is in git history and the model card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import random
import signal
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from shapes import world
from training.common import CACHE, save_atomic, setup
from training.tokenizer import load as load_tokenizer

# SD's training noise schedule rescaled to zero terminal SNR, v-prediction, sampling from the last timestep.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    clip_sample=False,
    steps_offset=1,
)
# The v1 model's objective (SD's schedule, epsilon): a checkpoint without an "objective" entry was trained for it.
V1_OBJECTIVE = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}


def objective(config: dict = SCHEDULER_CONFIG) -> dict:
    """What a checkpoint must have been trained for to be resumed (rather than used as initial weights)."""
    return {"prediction_type": config["prediction_type"], "rescale_betas_zero_snr": config.get("rescale_betas_zero_snr", False)}

TEXT_CONFIG = dict(
    vocab_size=49408,  # the full CLIP BPE vocabulary; the embedding table dominates the size, so keep hidden small
    hidden_size=96,  # 49408 x 96 = 4.7M of the model's ~12M parameters
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=96,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET_CONFIG = dict(
    sample_size=16,  # 16x16 latents -> 64x64 images by default
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),  # attention at 16x16 and 8x8
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    # ~2.4M MACs per 3x3 conv per sample at every level: 32 ch at 16x16, 64 at 8x8, 128 at 4x4. Measured on this
    # shared CPU: 0.7-0.8 s per batch of 64 vs 1.4-1.9 s (and 3.7 s under load) for (64, 128, 128); more updates won.
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    cross_attention_dim=96,  # = text hidden_size
    attention_head_dim=(2, 4, 4),  # diffusers' legacy name: the number of heads per block
    norm_num_groups=32,
)


def build_models(tiny: bool = False) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Text encoder and UNet from their configs; tiny=True shrinks both for smoke tests (vocab stays full)."""
    tc, uc = dict(TEXT_CONFIG), dict(UNET_CONFIG)
    if tiny:
        tc.update(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
        uc.update(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    return CLIPTextModel(CLIPTextConfig(**tc)), UNet2DConditionModel(**uc)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float = 5.0,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weight: min(SNR, gamma) / SNR for epsilon, max(min(SNR, gamma), 1) / (SNR + 1) for v.

    For v the plain Min-SNR weight min(SNR, gamma) / (SNR + 1) is 0 at zero terminal SNR, which would stop the model
    learning its first prediction; the floor keeps the x0 error's weight at 1 there.
    """
    a = alphas_cumprod[t]
    snr = a / (1 - a).clamp(min=1e-12)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma).clamp(min=1.0) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def noisy_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, cap: float) -> torch.Tensor:
    """1 + min(1/SNR, cap): plain epsilon MSE plus the x0-space error (eps error / SNR) of the noisy steps, capped.

    Where an object goes is decided at high noise, where an epsilon error barely moves the loss (x0 error = eps
    error / SNR); this adds weight there while keeping the low-noise steps at weight 1 (Min-SNR instead scaled them
    down ~100x and left a noisy texture).
    """
    a = alphas_cumprod[t]
    return 1 + torch.clamp((1 - a) / a, max=cap)


def loss_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, min_snr_gamma: float, noisy_cap: float,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample loss weights: Min-SNR when min_snr_gamma > 0, else noisy_weights when noisy_cap > 0, else 1."""
    if min_snr_gamma > 0:
        return min_snr_weights(alphas_cumprod, t, min_snr_gamma, prediction_type)
    if noisy_cap > 0:
        return noisy_weights(alphas_cumprod, t, noisy_cap)
    return torch.ones(t.shape)


class Data:
    """Pre-encoded latents (scaled) and their scenes; captions are drawn fresh for each batch."""

    def __init__(self, path: Path, tokenizer, p_background: float = world.P_BACKGROUND) -> None:
        d = torch.load(path / "latents.pt", weights_only=False)
        self.latents = d["latents"]
        self.scaling_factor = d["scaling_factor"]
        self.scenes = pickle.loads((path / "scenes.pkl").read_bytes())
        self.tokenizer = tokenizer
        self.p_background = p_background

    def batch(self, idx: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, 4, 16, 16) scaled, token ids (B, 77)) for dataset indices idx."""
        captions = [world.caption(self.scenes[i], rng, p_background=self.p_background) for i in idx.tolist()]
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.latents[idx].float() * self.scaling_factor, ids


def train(out: Path, minutes: float, batch_size: int, lr: float, seed: int, ema_decay: float = 0.999,
          warmup: int = 300, tiny: bool = False, bf16: bool = False, max_steps: int | None = None,
          ckpt_every_s: float = 300.0, data: Data | None = None, min_snr_gamma: float = 0.0,
          high_t_frac: float = 0.0, high_t_from: int = 400, noisy_weight: float = 0.0,
          scheduler_config: dict = SCHEDULER_CONFIG) -> dict:
    """Train until the wall-clock budget (minutes, counted across resumes) or max_steps; checkpoint to out/unet.pt.

    A checkpoint in out trained for another objective (see objective()) gives the initial weights of a fresh run.
    """
    ckpt = out / "unet.pt"
    torch.manual_seed(seed)
    data = data or Data(out, load_tokenizer(out / "tokenizer"))
    text_encoder, unet = build_models(tiny)
    ema_te, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = DDPMScheduler(**scheduler_config)
    goal = objective(scheduler_config)
    step, elapsed, log, warm_from, init_from = 0, 0.0, [], 0, None
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False)
        for m, k in ((text_encoder, "te"), (unet, "unet"), (ema_te, "ema_te"), (ema_unet, "ema_unet")):
            m.load_state_dict(s[k])
        if s.get("objective", V1_OBJECTIVE) != goal:  # weights only: a new run for the new objective
            init_from = {"objective": s.get("objective", V1_OBJECTIVE), "step": s["step"],
                         "restored_from": s.get("restored_from")}
            print(f"initialising a {goal} run from a {init_from['objective']} checkpoint (step {s['step']})", flush=True)
            s = {"step": 0, "elapsed": 0.0, "log": [], "init_from": init_from}
        init_from = s.get("init_from")
        step, elapsed, log = s["step"], s["elapsed"], s["log"]
        warm_from = s.get("warm_from", 0)
        if "opt" in s:
            opt.load_state_dict(s["opt"])
        else:  # restored from the exported model (training.restore): fresh Adam moments, so warm the LR up again
            warm_from = step
        if "gen" in s:
            gen.set_state(s["gen"])
            rng.setstate(s["rng"])
        else:  # new random streams, different from the original run's
            gen.manual_seed(seed + step)
            rng.seed(seed + step)
        print(f"resumed at step {step}, {elapsed / 60:.1f} min", flush=True)

    def save() -> None:
        save_atomic({"te": text_encoder.state_dict(), "unet": unet.state_dict(), "ema_te": ema_te.state_dict(),
                     "ema_unet": ema_unet.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                     "log": log, "gen": gen.get_state(), "rng": rng.getstate(), "scaling_factor": data.scaling_factor,
                     "warm_from": warm_from, "tiny": tiny, "budget_min": minutes, "objective": goal,
                     "init_from": init_from}, ckpt)

    budget = minutes * 60
    acp = sched.alphas_cumprod
    text_encoder.train(), unet.train()
    t_last, t_ckpt, run_loss, run_n = time.time(), time.time(), 0.0, 0
    try:  # Ctrl-C or SIGTERM (see main) ends the run with a checkpoint instead of losing up to ckpt_every_s of work
        while elapsed < budget and (max_steps is None or step < max_steps):
            # LR: linear warmup over steps, cosine over the wall-clock budget to 10%.
            p = min(1.0, elapsed / budget)
            cur_lr = lr * min(1.0, (step - warm_from + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
            for g in opt.param_groups:
                g["lr"] = cur_lr
            idx = torch.randint(0, len(data.latents), (batch_size,), generator=gen)
            latents, ids = data.batch(idx, rng)
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
            n_high = int(round(high_t_frac * batch_size))
            if n_high:  # extra samples where layout (position, shape, colour) is decided; weights stay plain MSE
                t[:n_high] = torch.randint(high_t_from, sched.config.num_train_timesteps, (n_high,), generator=gen)
            noisy = sched.add_noise(latents, noise, t)
            target = noise if goal["prediction_type"] == "epsilon" else sched.get_velocity(latents, noise, t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = text_encoder(ids)[0]
                pred = unet(noisy, t, hidden).sample
            per = (pred.float() - target).pow(2).mean((1, 2, 3))
            loss = (per * loss_weights(acp, t, min_snr_gamma, noisy_weight, goal["prediction_type"])).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            d = min(ema_decay, (1 + step) / (10 + step))
            ema_update(ema_te, text_encoder, d)
            ema_update(ema_unet, unet, d)
            now = time.time()
            elapsed += now - t_last
            t_last = now
            run_loss, run_n = run_loss + per.mean().item(), run_n + 1
            if step % 50 == 0:
                log.append({"step": step, "loss": run_loss / run_n, "lr": cur_lr, "min": elapsed / 60})
                run_loss, run_n = 0.0, 0  # the mean over the steps since the last log (fewer than 50 after a resume)
                print(json.dumps(log[-1]), flush=True)
            if now - t_ckpt > ckpt_every_s:
                save()
                t_ckpt = time.time()
                t_last = t_ckpt  # checkpoint time does not count against the budget
    except KeyboardInterrupt:
        print(f"interrupted at step {step}; saving", flush=True)
    save()
    return {"step": step, "elapsed_min": elapsed / 60, "loss": log[-1]["loss"] if log else None}


def load_checkpoint(out: Path = CACHE, ema: bool = True) -> tuple[CLIPTextModel, UNet2DConditionModel, dict]:
    """Text encoder and UNet (EMA weights by default) from out/unet.pt, plus the raw checkpoint dict."""
    s = torch.load(out / "unet.pt", weights_only=False)
    te, unet = build_models(s.get("tiny", False))
    te.load_state_dict(s["ema_te" if ema else "te"])
    unet.load_state_dict(s["ema_unet" if ema else "unet"])
    return te.eval(), unet.eval(), s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=CACHE)
    p.add_argument("--minutes", type=float, default=90, help="total training budget across resumes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-snr-gamma", type=float, default=0.0, help="Min-SNR loss weighting; 0 = plain MSE")
    p.add_argument("--high-t-frac", type=float, default=0.0,
                   help="fraction of each batch with t drawn from [--high-t-from, 1000) instead of uniformly")
    p.add_argument("--high-t-from", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--noisy-weight", type=float, default=0.0, help="loss weight 1 + min(1/SNR, this); 0 = plain MSE")
    p.add_argument("--p-background", type=float, default=world.P_BACKGROUND,
                   help="probability that a training caption names the background")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast; slower here (see module docstring)")
    p.add_argument("--no-bf16", action="store_true", help="the default; kept for old command lines")
    a = p.parse_args()
    setup(a.threads)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` saves a checkpoint like Ctrl-C does
    data = Data(a.out, load_tokenizer(a.out / "tokenizer"), p_background=a.p_background)
    print(train(a.out, a.minutes, a.batch_size, a.lr, a.seed, bf16=a.bf16 and not a.no_bf16,
                min_snr_gamma=a.min_snr_gamma, high_t_frac=a.high_t_frac, high_t_from=a.high_t_from,
                noisy_weight=a.noisy_weight, data=data))


if __name__ == "__main__":
    main()
