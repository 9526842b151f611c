"""Our loop against the stock diffusers pipelines: same seed, same components, same image, every family
and every compatible scheduler; plus observation, cancellation and x̂0 checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.schedulers import SCHEDULERS, compatible_keys, make_scheduler
from pipelines.types import GenerationRequest
from tests.tiny import TINY_SIZE, tiny_pipeline

FAMILIES = ["sd", "sd_v", "sd_zsnr", "sdxl", "pixart_sigma", "sd3"]
SIZE = 32
# The zero-terminal-SNR v-prediction model (tiny-shapes v2's kind) cannot run these: they have no rescaled schedule.
ZERO_SNR_REFUSED = {"pndm", "lms", "heun", "dpmpp_2m_karras"}  # the last: repeated timesteps (schedulers.py)


def _cases():
    for family in FAMILIES:
        kind = "flow" if family == "sd3" else "discrete"
        for key, spec in SCHEDULERS.items():
            # LCM only fits consistency-distilled models; its parity is checked on one (tests/test_honest_controls.py)
            if spec.kind == kind and not spec.distilled_only and not (family == "sd_zsnr" and key in ZERO_SNR_REFUSED):
                yield family, key


@pytest.fixture(scope="module")
def pipes(tiny_loader):
    """One tiny pipeline per family for our loop (conftest.tiny_loader)."""
    return tiny_loader


@pytest.fixture(scope="module")
def stock():
    """Separately built copies of the same tiny components, driven only through stock __call__."""
    return {family: tiny_pipeline(family) for family in FAMILIES}


def stock_run(stock, family: str, scheduler: str | None, **kw) -> tuple[torch.Tensor, np.ndarray]:
    """Stock __call__ with the scheduler swapped the usual way; returns (final latents, image in [0, 1])."""
    pipe = stock[family]
    model_scheduler = getattr(pipe, "_model_scheduler", None) or pipe.scheduler
    pipe._model_scheduler = model_scheduler
    pipe.scheduler = make_scheduler(model_scheduler, scheduler) if scheduler else type(model_scheduler).from_config(model_scheduler.config)
    extra = {"use_resolution_binning": False} if family == "pixart_sigma" else {}
    if family == "pixart_sigma" and kw.get("negative_prompt") is None:
        kw["negative_prompt"] = ""  # PixArt's __call__ default; it does not accept None
    final = {}

    def keep_latents(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    if family == "pixart_sigma":  # PixArt's __call__ only has the legacy per-step callback
        extra |= {"callback": lambda i, t, latents: final.update(latents=latents), "callback_steps": 1}
    else:
        extra |= {"callback_on_step_end": keep_latents}
    seed = kw.pop("seed")
    images = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw, **extra).images
    return final["latents"], images[0]


def request(family: str, **kw) -> GenerationRequest:
    base = dict(prompt="a red circle", model=family, num_inference_steps=4, guidance_scale=5.0, seed=3,
                width=TINY_SIZE[family], height=TINY_SIZE[family])
    return GenerationRequest(**(base | kw))


@pytest.mark.parametrize("family,scheduler", list(_cases()))
def test_matches_stock_pipeline(pipes, stock, family, scheduler):
    negative = "blue" if len(scheduler) % 2 else ""  # varied per case, the same in every process
    req = request(family, scheduler=scheduler, negative_prompt=negative)
    observer = CollectingObserver()
    ours = generate(req, observer, loader=pipes)
    unobserved = generate(req, loader=pipes)

    call = dict(prompt=req.prompt, negative_prompt=negative or None, num_inference_steps=4, guidance_scale=5.0,
                seed=3, height=SIZE, width=SIZE)
    stock_latents, stock_image = stock_run(stock, family, scheduler, **call)

    assert ours.scheduler == scheduler
    torch.testing.assert_close(ours.latents, stock_latents, rtol=1e-5, atol=1e-5)
    ours_image = np.asarray(ours.image).astype(np.float32) / 255.0
    assert ours_image.shape == (SIZE, SIZE, 3)
    assert np.abs(ours_image - stock_image).max() <= 1.0 / 255.0 + 1e-6
    # Observing changes nothing, and every loop iteration produced one event.
    torch.testing.assert_close(unobserved.latents, ours.latents, rtol=0, atol=0)
    assert len(observer.events) == ours.num_steps == ours.steps_completed
    assert [e.step for e in observer.events] == list(range(ours.num_steps))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_scheduler_and_no_cfg_match_stock(pipes, stock, family):
    """The model's own scheduler (scheduler=None), guidance 1 (single pass) and an empty prompt."""
    for prompt, scale in (("a blue star", 1.0), ("", 3.0)):
        ours = generate(request(family, prompt=prompt, guidance_scale=scale, scheduler=None), loader=pipes)
        expected, _ = stock_run(stock, family, None, prompt=prompt, num_inference_steps=4, guidance_scale=scale,
                                seed=3, height=SIZE, width=SIZE)
        torch.testing.assert_close(ours.latents, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_rescale_guidance_matches_stock_guidance_rescale(pipes, stock, family):
    req = request(family, scheduler="euler", guidance="rescale", guidance_params={"guidance_rescale": 0.7})
    ours = generate(req, loader=pipes)
    expected, _ = stock_run(stock, family, "euler", prompt=req.prompt, num_inference_steps=4, guidance_scale=5.0,
                            guidance_rescale=0.7, seed=3, height=SIZE, width=SIZE)
    torch.testing.assert_close(ours.latents, expected, rtol=1e-5, atol=1e-5)
    plain = generate(request(family, scheduler="euler"), loader=pipes)
    assert not torch.allclose(plain.latents, ours.latents), "rescale must change the result at φ=0.7"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 3])
def test_cancel_at_step_k_stops_after_k_events(pipes, family, k):
    observer = CollectingObserver(cancel_after=k)
    result = generate(request(family, num_inference_steps=6), observer, loader=pipes)
    assert len(observer.events) == k
    assert result.cancelled and result.steps_completed == k and result.num_steps >= 6
    # A run stopped at k has the same latents as the full run had at step k (diffusers' interrupt test).
    full = CollectingObserver()
    generate(request(family, num_inference_steps=6), full, loader=pipes)
    torch.testing.assert_close(observer.events[-1].latents, full.events[k - 1].latents, rtol=0, atol=0)
    assert result.image.size == (SIZE, SIZE)


@pytest.mark.parametrize("family,scheduler", list(_cases()))
def test_last_x0_decodes_to_the_final_image(pipes, family, scheduler):
    observer = CollectingObserver()
    result = generate(request(family, scheduler=scheduler, num_inference_steps=8), observer, loader=pipes)
    pipe, _ = pipes.view(family, scheduler)
    from pipelines.families import family_of

    with torch.no_grad():
        decoded = family_of(pipe).decode(pipe, observer.events[-1].denoised)
    x0_image = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    final = np.asarray(result.image).astype(np.float32) / 255.0
    assert np.abs(x0_image - final).mean() < 0.02, "the last x̂0 should be (nearly) the final image"


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "lms", "heun", "dpmpp_2m", "unipc", "pndm"])
@pytest.mark.parametrize("family", ["sd", "sd_v"])
def test_x0_of_guided_prediction_is_cfg_of_x0s(pipes, family, scheduler):
    """x̂0 is linear in the model output: the scheduler's own x̂0 (or ours) equals CFG applied to the x̂0 of the
    conditional and unconditional predictions, which we derive. This checks the derivation against the
    schedulers that return pred_original_sample (Euler, Euler a, LMS, Heun)."""
    observer = CollectingObserver()
    generate(request(family, scheduler=scheduler, guidance_scale=4.0), observer, loader=pipes)
    for e in observer.events:
        expected = e.denoised_uncond + 4.0 * (e.denoised_cond - e.denoised_uncond)
        torch.testing.assert_close(e.denoised, expected, rtol=1e-4, atol=1e-4)
        assert e.effective_scale == 4.0 and e.guidance_delta_norm > 0


def test_events_carry_sigma_and_timestep(pipes):
    observer = CollectingObserver()
    generate(request("sd", scheduler="euler", num_inference_steps=5), observer, loader=pipes)
    sigmas = [e.sigma for e in observer.events]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > 1.0
    assert [e.timestep for e in observer.events] == sorted((e.timestep for e in observer.events), reverse=True)
    flow = CollectingObserver()
    generate(request("sd3", num_inference_steps=5), flow, loader=pipes)
    assert all(0.0 < e.sigma <= 1.0 for e in flow.events)


def test_without_cfg_events_have_no_cond_uncond(pipes):
    observer = CollectingObserver()
    generate(request("sd", guidance_scale=1.0), observer, loader=pipes)
    assert all(e.denoised_cond is None and e.guidance_delta_norm is None and e.effective_scale == 1.0
               for e in observer.events)


@pytest.mark.parametrize("family", FAMILIES)
def test_incompatible_scheduler_names_valid_keys(pipes, family):
    pipe = pipes.get(family)
    bad = "euler" if family == "sd3" else "flow_euler"
    with pytest.raises(ValueError) as e:
        generate(request(family, scheduler=bad), loader=pipes)
    for key in compatible_keys(pipe.scheduler):
        assert key in str(e.value)
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        generate(request(family, scheduler="nope"), loader=pipes)


@pytest.mark.parametrize("scheduler", sorted(ZERO_SNR_REFUSED))
def test_zero_snr_model_refuses_samplers_without_its_schedule(pipes, scheduler):
    """A sampler that cannot rebuild the zero-terminal-SNR schedule would run one the model never saw: refused, with
    why and what works instead; the others all run (test_matches_stock_pipeline)."""
    pipe = pipes.get("sd_zsnr")
    assert set(compatible_keys(pipe.scheduler)) == ({k for k, s in SCHEDULERS.items() if s.kind == "discrete"}
                                                    - ZERO_SNR_REFUSED - {"lcm"})
    with pytest.raises(ValueError, match=r"zero-terminal-SNR.*valid for this model: ddim, ddpm, euler") as e:
        generate(request("sd_zsnr", scheduler=scheduler), loader=pipes)
    assert "dpmpp_2m" in str(e.value) and "unipc" in str(e.value)
    assert scheduler in compatible_keys(pipes.get("sd_v").scheduler)  # the same sampler fits a v model without it


def test_zero_snr_run_starts_from_pure_noise(pipes):
    """Trailing spacing on the rescaled schedule starts at t = 999, where alpha_bar = 0: x̂0 of step 0 is the model's
    output alone (v = -x0 there), whatever x_T is."""
    observer = CollectingObserver()
    generate(request("sd_zsnr", scheduler="ddim", guidance_scale=1.0), observer, loader=pipes)
    assert observer.events[0].timestep == 999
    assert float(pipes.get("sd_zsnr").scheduler.alphas_cumprod[999]) < 1e-6


def test_size_not_multiple_of_factor_is_refused(pipes):
    # As stock check_inputs: 8 for SD/SDXL/PixArt even with a factor-2 VAE; VAE factor × patch for SD3.
    with pytest.raises(ValueError, match="width 36 is not a multiple of 8"):
        generate(request("sd", width=36), loader=pipes)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        generate(request("pixart_sigma", height=28), loader=pipes)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        generate(request("sd3", height=33), loader=pipes)
    assert generate(request("sd3", height=34, num_inference_steps=1), loader=pipes).height == 34


def test_unknown_model_is_refused_with_a_clear_message(pipes):
    with pytest.raises(ValueError, match="could not be loaded|no such folder"):
        generate(request("sd", model="/nonexistent/folder"), loader=pipes)
    allow = ModelLoader(device="cpu", allowed=["tiny-shapes"])
    with pytest.raises(ValueError, match="choose one of: tiny-shapes"):
        generate(request("sd", model="some/other"), loader=allow)


def test_random_seed_is_reported_and_reproduces(pipes):
    first = generate(request("sd", seed=None), loader=pipes)
    again = generate(request("sd", seed=first.seed), loader=pipes)
    torch.testing.assert_close(first.latents, again.latents, rtol=0, atol=0)


@pytest.mark.parametrize("flag_everything", [False, True])
def test_safety_checker_applies_as_in_stock(flag_everything):
    from tests.tiny import tiny_sd_with_safety_checker

    loader = ModelLoader(device="cpu")
    loader.add("checked", tiny_sd_with_safety_checker(flag_everything))
    ours = generate(GenerationRequest("a red circle", model="checked", num_inference_steps=3, seed=1, width=32,
                                      height=32), loader=loader)
    stock = tiny_sd_with_safety_checker(flag_everything)(
        "a red circle", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1), width=32, height=32)
    assert stock.nsfw_content_detected == [flag_everything]
    assert np.array_equal(np.asarray(ours.image), np.asarray(stock.images[0]))
    assert (np.asarray(ours.image).max() == 0) == flag_everything  # flagged images are blacked out


PAG_PIPELINES = {
    "sd": "StableDiffusionPAGPipeline",
    "sdxl": "StableDiffusionXLPAGPipeline",
    "pixart_sigma": "PixArtSigmaPAGPipeline",
    "sd3": "StableDiffusion3PAGPipeline",
}


@pytest.mark.parametrize("scale", [5.0, 1.0])
@pytest.mark.parametrize("family", list(PAG_PIPELINES))
def test_pag_matches_stock_pag_pipelines(pipes, family, scale):
    """guidance='pag' against diffusers' own PAG pipeline on the same components (its default PAG layers)."""
    import diffusers

    import inspect

    cls = getattr(diffusers, PAG_PIPELINES[family])
    accepted = inspect.signature(cls.__init__).parameters
    stock_pipe = cls(**{k: v for k, v in tiny_pipeline(family).components.items() if k in accepted})
    stock_pipe.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if family == "pixart_sigma" else {}
    expected = stock_pipe("a red circle", num_inference_steps=3, guidance_scale=scale, pag_scale=2.5, height=SIZE,
                          width=SIZE, generator=torch.Generator("cpu").manual_seed(5), output_type="np", **extra).images[0]
    observer = CollectingObserver()
    ours = generate(request(family, num_inference_steps=3, guidance_scale=scale, seed=5, guidance="pag",
                            guidance_params={"pag_scale": 2.5}), observer, loader=pipes)
    assert np.abs(np.asarray(ours.image).astype(np.float32) / 255.0 - expected).max() <= 1.0 / 255.0 + 1e-6
    # The perturbed processors are gone again: a plain run afterwards still matches stock CFG.
    plain = generate(request(family, num_inference_steps=3, guidance_scale=scale, seed=5), loader=pipes)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(ours.image))
    assert all((e.denoised_cond is not None) == (scale > 1) for e in observer.events)
