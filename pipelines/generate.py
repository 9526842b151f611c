"""The one denoising loop. Every image in this project (UI, CLI, tests, benchmarks) is made by generate()."""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

import torch

from guidance.base import GuidanceContext, GuidanceMethod, Predictions
from guidance.registry import create as create_guidance
from pipelines.errors import NonFiniteLatents
from pipelines.families import family_of
from pipelines.loading import ModelLoader
from pipelines.observers import Observer
from pipelines.schedulers import compatible_keys
from pipelines.types import GenerationRequest, GenerationResult, StepEvent, Timings
from pipelines.x0 import predict_x0, sigma_at
from pipelines.words import counted


def resolve_size(request: GenerationRequest, pipe, family) -> tuple[int, int]:
    """(height, width) from the request or the model's default; refuses sizes the model cannot render."""
    multiple = family.size_multiple(pipe)
    default = family.default_size(pipe)
    height, width = request.height or default, request.width or default
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"{name} {value} is not a multiple of {multiple}, this model's size factor; "
                f"use a multiple of {multiple} such as {lower} or {lower + multiple}"
            )
    return height, width


def check_timesteps(scheduler, timesteps: torch.Tensor, num_inference_steps: int) -> None:
    """Refuse a schedule that indexes past the training timesteps: 'leading' spacing with steps_offset=1 (PNDM's
    default config) at 1000 steps starts at t=1000, and the scheduler (stock diffusers too) then reads
    alphas_cumprod[1000] of 1000. Schedulers that keep their own sigmas never index by t."""
    train = getattr(scheduler.config, "num_train_timesteps", None)
    if getattr(scheduler, "sigmas", None) is not None or train is None or not len(timesteps):
        return
    first = int(timesteps.max())
    if first >= train:
        config = scheduler.config
        raise ValueError(
            f"{type(scheduler).__name__} (timestep_spacing={config.get('timestep_spacing')!r}, steps_offset="
            f"{config.get('steps_offset')}) cannot take {counted(num_inference_steps, 'step')}: its first timestep "
            f"would be {first}, past the {train} it was trained on; use at most "
            f"{counted(num_inference_steps - (first - train + 1), 'step')} or another scheduler")


def fewer_steps(scheduler, num_steps: int, tries: int = 20) -> int | None:
    """The largest step count below `num_steps` (within `tries`) whose schedule repeats no timestep and starts inside
    the training timesteps, the two things that made DPM-Solver's latents NaN here (diffusers 0.42, steps_offset=1:
    'linspace' at 1000 steps repeats t = 500; 'leading' at 1000 puts every step on t = 1, at 999 starts at t = 1000).
    None when none does (Heun repeats every timestep by design) or the schedule cannot be built without the model."""
    probe = type(scheduler).from_config(scheduler.config)
    train = probe.config.get("num_train_timesteps", 1000)
    for n in range(num_steps - 1, max(0, num_steps - 1 - tries), -1):
        try:
            probe.set_timesteps(n)
        except Exception:  # e.g. dynamic shifting needs the image size; a hint must never hide the error it serves
            return None
        t = probe.timesteps
        if bool((t[1:] != t[:-1]).all()) and float(t.max()) < train:
            return n
    return None


def non_finite_error(scheduler, scheduler_key: str, timesteps: torch.Tensor, i: int) -> NonFiniteLatents:
    """The error for latents that loop step `i` (0-based) made NaN or infinite, with what to try. It names the step's
    timestep when it repeats the previous one: DPM-Solver and UniPC then divide by a zero log-SNR step."""
    repeated = int(timesteps[i]) if i > 0 and timesteps[i] == timesteps[i - 1] else None
    fits = compatible_keys(scheduler)
    alternative = next((k for k in ("euler", "flow_euler", "ddim", "dpmpp_2m") if k != scheduler_key and k in fits),
                       None)
    return NonFiniteLatents(i + 1, len(timesteps), scheduler_key, repeated, fewer_steps(scheduler, len(timesteps)),
                            alternative)


def apply_guidance(
    method: GuidanceMethod, output: torch.Tensor, names: tuple[str, ...], ctx: GuidanceContext
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Name the parts of the batched model output (`names`, the step's needs in PREDICTIONS order) and hand them to
    the guidance method in one call; a step that needs only "cond" is that prediction as it is.

    Returns (guided prediction, conditional prediction, unconditional prediction or None, effective scale).
    """
    if names == ("cond",):
        return output, output, None, 1.0
    preds = Predictions(**dict(zip(names, output.chunk(len(names)))))
    guided = method(preds, ctx)
    return guided.pred, preds.cond, preds.uncond, guided.effective_scale


@dataclass(frozen=True)
class Snapshot:
    """A run paused before loop index `step`: enough to continue it there (generate's `start`) without re-running
    the steps before. Schedulers are stateful (step_index, a multistep method's model_outputs), so it holds a copy."""

    step: int  # the loop index the run continues at (0 <= step < num_steps)
    latents: torch.Tensor  # x_t entering that step, (B, C, h, w)
    scheduler: Any  # a deep copy of the run's scheduler there


@torch.no_grad()
def generate(
    request: GenerationRequest,
    observer: Observer | None = None,
    *,
    loader: ModelLoader | None = None,
    start: Snapshot | None = None,
    snapshot: tuple[Collection[int], Callable[[Snapshot], None]] | None = None,
) -> GenerationResult:
    """Make the image(s) of `request`, handing a StepEvent to `observer` after every loop iteration.

    Same seed and settings give the same image as the stock diffusers pipeline (tests/test_parity.py).
    The noise comes from a CPU torch.Generator seeded with the seed, so results do not depend on the device. A batch
    (num_images_per_prompt n) runs as one batched model call per step with one generator per image, seeded
    seed + i, as the stock pipeline does when given a list of generators: image i is the single run with seed + i.

    snapshot=(steps, keep) hands keep() a Snapshot of the run before each loop index in `steps`; start=one of them
    continues a run of the same request there (the steps before it are not run or observed; that the snapshot comes
    from this request, prompt and seed is the caller's to keep). With request.branch at step k, that is the
    branch of the whole re-run, pixel for pixel (tests/test_explain2.py), at the cost of the steps after k only.
    """
    observer = observer or Observer()
    loader = loader or ModelLoader()
    t_start = time.perf_counter()
    with loader.run_lock:
        # 1. Load (cached) and pick the pipeline view that owns this run's scheduler
        pipe, scheduler_key = loader.view(request.model, request.scheduler)
        family = family_of(pipe)
        scheduler = pipe.scheduler
        device = loader.device if loader.offload else pipe.device
        t_loaded = time.perf_counter()

        # 2. Resolve what the request left open, and validate against this model
        height, width = resolve_size(request, pipe, family)
        seed = request.seed if request.seed is not None else random.randrange(2**32)
        num_images = request.num_images_per_prompt
        # One generator for one image (the stock pipeline's usual call), a list for a batch: image i draws its
        # initial noise and every step's fresh noise from its own generator, so it does not depend on the others.
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
        generator = generators[0] if num_images == 1 else generators
        # The CFG scale and whether there is an unconditional pass: guidance_scale (diffusers' rule: above 1, never
        # for LCM UNets), or for Flux true_cfg_scale (its guidance_scale is the distilled embedding, see predict)
        cfg_scale, do_cfg = family.cfg_plan(pipe, request)
        prediction_type = family.prediction_type(pipe)
        # Defaults may depend on the prediction type (CFG-Zero*'s zero-init only suits flow models).
        method = create_guidance(request.guidance, cfg_scale, request.guidance_params, prediction_type)

        # 3. Encode the prompt ("" negative means diffusers' default None): each distinct (prompt, negative prompt)
        # of its schedule once (one pair without [from:to:when]); the loop picks the step's pair in 5a
        schedule = request.schedule
        conds = [family.encode(pipe, prompt, negative or None, do_cfg, device, height, width, num_images)
                 for prompt, negative in schedule.pairs]
        cond = conds[0]
        t_encoded = time.perf_counter()

        # 4. Timesteps, then initial latents (scaled by the scheduler's init_noise_sigma)
        latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        timesteps = family.timesteps(pipe, request.num_inference_steps, device, latent_hw)
        check_timesteps(scheduler, timesteps, request.num_inference_steps)
        latents = family.prepare_latents(pipe, num_images, height, width, cond.embeds.dtype, device, generator)
        step_kwargs = family.step_kwargs(pipe, generator)
        num_steps = len(timesteps)
        if start is not None:  # continue a snapshot: its x_t and its scheduler state (copied: it may start others)
            if not 0 <= start.step < num_steps or start.latents.shape != latents.shape:
                raise ValueError(f"a snapshot starts at a step from 0 to {num_steps - 1} with latents of shape "
                                 f"{tuple(latents.shape)}, got step {start.step} and {tuple(start.latents.shape)}")
            latents = start.latents.to(latents.device, latents.dtype)
            vars(scheduler).update(copy.deepcopy(vars(start.scheduler)))

        # 5. Denoise (a method with a perturbed pass says what it perturbs; the family resolves it for the run)
        perturb = method.perturbation is not None
        traced = None if perturb else loader.traced_unet(pipe)  # small CPU UNets: same output, less Python
        denoised = latents
        steps_completed = 0
        cancelled = False
        with family.perturbed_pass(pipe, method.perturbation) if perturb else contextlib.nullcontext() as perturbed:
            for i, t in enumerate(timesteps):
                if start is not None and i < start.step:
                    continue
                if snapshot is not None and i in snapshot[0]:
                    snapshot[1](Snapshot(i, latents.detach().clone(), copy.deepcopy(scheduler)))
                if observer.is_cancelled():
                    cancelled = True
                    break
                if request.branch is not None and i == request.branch[0]:
                    for k, g in enumerate(generators):  # a branch: the same x_t, fresh noise from here on
                        g.manual_seed(request.branch[1] + k)
                # 5a. This step's conditioning (a prompt schedule switches it), the guidance context and the
                # predictions this step needs (the method says: uncond, cond, perturbed)
                cond = conds[schedule.pair_index(i)]
                sigma = sigma_at(scheduler, i, t, family.flow)
                ctx = GuidanceContext(step=i, num_steps=num_steps, timestep=float(t), sigma=sigma)
                names = method.needs(ctx, do_cfg)
                with_uncond = "uncond" in names

                # 5b. Model prediction, batched [uncond, cond, perturbed] as diffusers batches it
                copies = len(names)
                model_input = torch.cat([latents] * copies) if copies > 1 else latents
                if hasattr(scheduler, "scale_model_input"):
                    model_input = scheduler.scale_model_input(model_input, t)
                # (the perturbed part, last in the batch, through the method's perturbation: PAG, SLG, SEG, …)
                with perturbed.install(copies) if "perturbed" in names else contextlib.nullcontext():
                    output = family.predict(pipe, model_input, t, cond, with_uncond, request.guidance_scale,
                                            "perturbed" in names, traced)

                # 5c. Guidance
                pred, pred_cond, pred_uncond, effective_scale = apply_guidance(method, output, names, ctx)
                delta_norm = None if pred_uncond is None else float((pred_cond[0] - pred_uncond[0]).float().norm())

                # 5d. Scheduler step x_t -> x_{t-1}; x̂0 from the scheduler where it gives one, else derived
                sample = latents
                step = scheduler.step(pred, t, sample, **step_kwargs, return_dict=True)
                latents = step.prev_sample
                # 5e. Stop on NaN/inf: they never recover and decode to a black image reported as done. Before the
                # observer, so it never sees (or writes previews of) the broken step.
                if not torch.isfinite(latents).all():
                    raise non_finite_error(scheduler, scheduler_key, timesteps, i)
                denoised = getattr(step, "pred_original_sample", None)
                if denoised is None:
                    denoised = getattr(step, "denoised", None)  # LCM's boundary-conditioned x̂0
                if denoised is None:
                    denoised = predict_x0(scheduler, sigma, sample, pred, prediction_type)
                steps_completed = i + 1

                # 5f. Observe (copies, so an observer can never alter the run)
                observer.on_step(StepEvent(
                    step=i,
                    num_steps=num_steps,
                    timestep=float(t),
                    sigma=sigma,
                    latents=latents.detach().clone(),
                    denoised=denoised.detach().clone(),
                    denoised_cond=None if pred_uncond is None else predict_x0(scheduler, sigma, sample, pred_cond, prediction_type),
                    denoised_uncond=None if pred_uncond is None else predict_x0(scheduler, sigma, sample, pred_uncond, prediction_type),
                    guidance_delta_norm=delta_norm,
                    effective_scale=effective_scale,
                    elapsed=time.perf_counter() - t_encoded,
                ))
        t_denoised = time.perf_counter()

        # 6. Decode: the final latents, or the last x̂0 when stopped early (the best image there is)
        final = denoised if cancelled and steps_completed else latents
        decoded = family.decode(pipe, final)
        images = family.to_pil(pipe, decoded, device, cond.embeds.dtype)
        t_end = time.perf_counter()

    return GenerationResult(
        image=images[0],
        images=tuple(images),
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        seed=seed,
        request=request,
        timings=Timings(
            load=t_loaded - t_start,
            encode=t_encoded - t_loaded,
            denoise=t_denoised - t_encoded,
            decode=t_end - t_denoised,
            total=t_end - t_start,
        ),
        latents=latents.detach(),
        steps_completed=steps_completed,
        num_steps=num_steps,
        cancelled=cancelled,
        scheduler=scheduler_key,
        family=family.key,
        height=height,
        width=width,
    )
