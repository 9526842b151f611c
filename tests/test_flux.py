"""Flux.1 (issue 25, item 1): our loop against stock FluxPipeline on tiny random Flux pipelines (dev-shaped, with
the distilled guidance input and the dynamic shift; schnell-shaped, without either), in both guidance modes
(diffusers' guidance_scale, and true CFG: true_cfg_scale with a negative prompt), over every scheduler Flux takes,
one image and a batch; plus what the observer sees (unpacked latents and x̂0) and what other families refuse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler

from pipelines.__main__ import main
from pipelines.explain.dissect import dissect
from pipelines.families import family_of
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.previews import FLUX as FLUX_FORMAT
from pipelines.previews import Previewer, latent_format_for
from pipelines.schedulers import SCHEDULERS, SchedulerSpec, compatible_keys, denoiser_config, make_scheduler, why_not
from pipelines.types import GenerationRequest
from tests.test_previews_guidance import tiny_taesd
from tests.tiny import tiny_pipeline

FLUX = ("flux", "flux_schnell")
SIZE = 32
STEPS = 4
CHANNELS = 16  # Flux's latent channels (the tiny VAE has them too)


def _schedulers() -> list[str]:
    """Every registry scheduler that fits a Flux transformer (flow schedulers whose set_timesteps takes FluxPipeline's
    sigmas and mu); at least flow_euler."""
    pipe = tiny_pipeline("flux")
    keys = compatible_keys(pipe.scheduler, denoiser_config(pipe))
    assert "flow_euler" in keys
    return keys


SCHEDULER_KEYS = _schedulers()


@pytest.fixture(scope="module")
def loader():
    """Our side: the tiny Flux pipelines under their family keys."""
    loader = ModelLoader(device="cpu")
    for key in FLUX:
        loader.add(key, tiny_pipeline(key))
    return loader


@pytest.fixture(scope="module")
def stock():
    """Separately built copies of the same components, driven only through FluxPipeline.__call__."""
    return {key: tiny_pipeline(key) for key in FLUX}


def stock_run(stock, model: str, scheduler: str | None, seeds: list[int], **kw) -> tuple[torch.Tensor, np.ndarray]:
    """FluxPipeline.__call__ with the scheduler swapped the usual way; (final latents unpacked (B, 16, h, w),
    images (B, H, W, 3) in [0, 1])."""
    pipe = stock[model]
    own = getattr(pipe, "_model_scheduler", None) or pipe.scheduler
    pipe._model_scheduler = own
    pipe.scheduler = make_scheduler(own, scheduler, denoiser_config(pipe)) if scheduler else type(own).from_config(own.config)
    final = {}

    def keep_latents(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images = pipe(generator=generators[0] if len(seeds) == 1 else generators, num_images_per_prompt=len(seeds),
                  height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", callback_on_step_end=keep_latents,
                  **kw).images
    return pipe._unpack_latents(final["latents"], SIZE, SIZE, pipe.vae_scale_factor), images


def request(model: str, **kw) -> GenerationRequest:
    base = dict(prompt="a red circle", model=model, num_inference_steps=STEPS, guidance_scale=3.5, seed=3,
                width=SIZE, height=SIZE)
    return GenerationRequest(**(base | kw))


def assert_same(ours, stock_latents: torch.Tensor, stock_images: np.ndarray) -> None:
    torch.testing.assert_close(ours.latents, stock_latents, rtol=1e-5, atol=1e-5)
    assert len(ours.images) == len(stock_images)
    for image, expected in zip(ours.images, stock_images):
        got = np.asarray(image).astype(np.float32) / 255.0
        assert got.shape == (SIZE, SIZE, 3)
        assert np.abs(got - expected).max() <= 1.0 / 255.0 + 1e-6


@pytest.mark.parametrize("scheduler", SCHEDULER_KEYS)
@pytest.mark.parametrize("model", FLUX)
def test_distilled_guidance_matches_stock(loader, stock, model, scheduler):
    """guidance_scale is diffusers' guidance_scale: the distilled guidance input (dev; schnell has none), one pass;
    a negative prompt without true CFG is not used, as in FluxPipeline."""
    observer = CollectingObserver()
    ours = generate(request(model, scheduler=scheduler, negative_prompt="blue"), observer, loader=loader)
    expected = stock_run(stock, model, scheduler, [3], prompt="a red circle", guidance_scale=3.5)
    assert ours.scheduler == scheduler and ours.family == "flux"
    assert_same(ours, *expected)
    assert len(observer.events) == ours.num_steps == STEPS
    assert all(e.denoised_cond is None and e.denoised_uncond is None for e in observer.events), "one pass, no CFG"


@pytest.mark.parametrize("scheduler", SCHEDULER_KEYS)
@pytest.mark.parametrize("model", FLUX)
def test_true_cfg_matches_stock(loader, stock, model, scheduler):
    """true_cfg_scale > 1 with a negative prompt: two passes, neg + s (cond - neg), as FluxPipeline."""
    observer = CollectingObserver()
    ours = generate(request(model, scheduler=scheduler, negative_prompt="blue", true_cfg_scale=4.0), observer,
                    loader=loader)
    expected = stock_run(stock, model, scheduler, [3], prompt="a red circle", negative_prompt="blue",
                         true_cfg_scale=4.0, guidance_scale=3.5)
    assert_same(ours, *expected)
    plain = generate(request(model, scheduler=scheduler, negative_prompt="blue"), loader=loader)
    assert not torch.allclose(plain.latents, ours.latents), "true CFG at 4 must change the result"
    for event in observer.events:  # the dissection's inputs: both x̂0, unpacked
        assert event.denoised_cond.shape == event.denoised_uncond.shape == (1, CHANNELS, SIZE // 2, SIZE // 2)
        assert event.guidance_delta_norm > 0


def test_true_cfg_with_an_empty_negative_prompt_is_cfg_against_the_empty_prompt(loader, stock):
    """Our empty negative prompt is diffusers' None everywhere else, but FluxPipeline would then skip true CFG
    silently; here true CFG runs against "" (what CFG's unconditional pass is for every other family)."""
    ours = generate(request("flux", true_cfg_scale=2.5), loader=loader)
    expected = stock_run(stock, "flux", None, [3], prompt="a red circle", negative_prompt="", true_cfg_scale=2.5,
                         guidance_scale=3.5)
    assert_same(ours, *expected)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_batch_matches_stock_with_a_generator_per_image(loader, stock, true_cfg_scale):
    """num_images_per_prompt 2: one batched run, image i from seed + i, as FluxPipeline given a list of generators
    (its true CFG makes one call per condition for the whole batch)."""
    observer = CollectingObserver()
    ours = generate(request("flux", negative_prompt="blue", true_cfg_scale=true_cfg_scale, num_images_per_prompt=2),
                    observer, loader=loader)
    expected = stock_run(stock, "flux", None, [3, 4], prompt="a red circle", negative_prompt="blue",
                         true_cfg_scale=true_cfg_scale, guidance_scale=3.5)
    assert_same(ours, *expected)
    assert observer.events[0].latents.shape == (2, CHANNELS, SIZE // 2, SIZE // 2)
    alone = generate(request("flux", negative_prompt="blue", true_cfg_scale=true_cfg_scale, seed=4), loader=loader)
    torch.testing.assert_close(ours.latents[1:], alone.latents, rtol=1e-5, atol=1e-5)


def test_guidance_scale_is_the_distilled_input(loader):
    """dev takes guidance_scale as an input (another scale, another image, still one pass); schnell has no such
    input (any scale, the same image)."""
    dev = [generate(request("flux", guidance_scale=g), loader=loader).latents for g in (1.0, 5.0)]
    assert not torch.allclose(dev[0], dev[1])
    schnell = [generate(request("flux_schnell", guidance_scale=g), loader=loader).latents for g in (0.0, 5.0)]
    torch.testing.assert_close(schnell[0], schnell[1], rtol=0, atol=0)


def test_steps_show_unpacked_latents_and_the_last_x0_is_the_image(loader):
    observer = CollectingObserver()
    result = generate(request("flux", num_inference_steps=8, negative_prompt="blue", true_cfg_scale=2.0), observer,
                      loader=loader)
    for event in observer.events:
        assert event.latents.shape == event.denoised.shape == (1, CHANNELS, SIZE // 2, SIZE // 2)
        assert torch.isfinite(event.denoised).all()
    pipe, _ = loader.view("flux", None)
    with torch.no_grad():
        decoded = family_of(pipe).decode(pipe, observer.events[-1].denoised)
    x0_image = pipe.image_processor.postprocess(decoded, output_type="np")[0]
    final = np.asarray(result.image).astype(np.float32) / 255.0
    # Flux's last sigma is 1/N, not 0: the last x̂0 is close to the final latents, not equal
    assert np.abs(x0_image - final).mean() < 0.02


@pytest.mark.parametrize("k", [1, 3])
def test_cancel_at_step_k_equals_the_full_run_at_k(loader, k):
    observer = CollectingObserver(cancel_after=k)
    result = generate(request("flux", num_inference_steps=5), observer, loader=loader)
    assert result.cancelled and result.steps_completed == k == len(observer.events)
    full = CollectingObserver()
    generate(request("flux", num_inference_steps=5), full, loader=loader)
    torch.testing.assert_close(observer.events[-1].latents, full.events[k - 1].latents, rtol=0, atol=0)


def test_the_flux_schedule_is_shifted_by_the_image_size(loader):
    """dev's dynamic shift: mu from the packed sequence length (FluxPipeline's calculate_shift); larger images get
    a schedule that stays longer at high noise."""
    pipe, _ = loader.view("flux", "flow_euler")
    family = family_of(pipe)
    small = family.timesteps(pipe, STEPS, torch.device("cpu"), (16, 16)).clone()
    large = family.timesteps(pipe, STEPS, torch.device("cpu"), (128, 128)).clone()
    assert small[0] == large[0] == 1000
    assert (large[1:] > small[1:]).all()


def test_schedulers_flux_cannot_take_are_refused_with_the_reason():
    """A flow scheduler whose set_timesteps takes no sigmas and mu cannot run FluxPipeline's schedule."""
    pipe = tiny_pipeline("flux")
    assert set(SCHEDULER_KEYS) == {k for k, s in SCHEDULERS.items() if s.kind == "flow"
                                   if why_not(k, pipe.scheduler, denoiser_config(pipe)) is None}
    SCHEDULERS["flow_heun_probe"] = SchedulerSpec("flow_heun_probe", FlowMatchHeunDiscreteScheduler, "Heun", "flow",
                                                  False)
    try:
        reason = why_not("flow_heun_probe", pipe.scheduler, denoiser_config(pipe))
        sd3 = tiny_pipeline("sd3")
        assert why_not("flow_heun_probe", sd3.scheduler, denoiser_config(sd3)) is None
    finally:
        del SCHEDULERS["flow_heun_probe"]
    assert reason is not None and "sigmas" in reason and "mu" in reason


def test_pag_is_refused_for_flux(loader):
    with pytest.raises(ValueError, match="not available for Flux"):
        generate(request("flux", guidance="pag", true_cfg_scale=2.0, negative_prompt="blue"), loader=loader)


def test_true_cfg_scale_is_refused_for_other_families(tiny_loader):
    with pytest.raises(ValueError, match="true_cfg_scale is for Flux models.*leave true_cfg_scale at 1"):
        generate(GenerationRequest(prompt="a red circle", model="sd", num_inference_steps=2, true_cfg_scale=2.0,
                                   seed=0, width=32, height=32), loader=tiny_loader)


@pytest.mark.parametrize("value", [-1.0, float("nan"), True, "2"])
def test_true_cfg_scale_is_validated(value):
    with pytest.raises(ValueError, match="true_cfg_scale must be a finite number >= 0"):
        GenerationRequest(prompt="x", true_cfg_scale=value)


def test_true_cfg_scale_is_in_the_request_json_only_when_set():
    assert "true_cfg_scale" not in GenerationRequest(prompt="x").to_dict()
    assert GenerationRequest(prompt="x", true_cfg_scale=3).to_dict()["true_cfg_scale"] == 3.0


def test_previews_use_flux_latent_format_on_unpacked_latents(loader):
    """Flux's published 16-channel latent→RGB map (ComfyUI latent_formats.Flux) and TAEF1 (injected here: the
    offline cache has none) preview the loop's unpacked x̂0 at image size."""
    pipe, _ = loader.view("flux", None)
    assert latent_format_for(pipe) == FLUX_FORMAT and FLUX_FORMAT.taesd_repo == "madebyollin/taef1"
    assert Previewer(pipe).kinds == ("channels", "rgb", "decode")
    observer = CollectingObserver()
    generate(request("flux", num_inference_steps=2), observer, loader=loader)
    previewer = Previewer(pipe, taesd=tiny_taesd(CHANNELS))
    for kind in ("rgb", "taesd", "decode"):
        image = previewer.render(kind, observer.events[-1].denoised)
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3), kind
    grid = previewer.render("channels", observer.events[-1].denoised)  # a grid of the 16 channels, greys
    assert grid.dtype == np.uint8 and grid.shape[0] > SIZE // 2


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_dissection_shows_both_passes_with_true_cfg_and_one_with_distilled_guidance(loader, true_cfg_scale):
    report = list(dissect(request("flux", negative_prompt="blue", true_cfg_scale=true_cfg_scale), loader=loader))[-1]
    assert report.done and len(report.steps) == STEPS
    for step in report.steps:
        assert step.x0.shape == (SIZE, SIZE, 3)
        if true_cfg_scale > 1:
            assert step.guided and step.x0_cond.shape == step.x0_uncond.shape == (SIZE, SIZE, 3)
            assert step.effective_scale == true_cfg_scale
        else:  # distilled guidance: the scale went into the model, there is no second pass to show
            assert not step.guided and step.x0_cond is None and step.effective_scale == 1.0


@pytest.mark.parametrize("method", ["slg", "seg", "autoguidance"])
def test_perturbed_pass_methods_are_refused_for_flux(loader, method):
    with pytest.raises(ValueError, match="not available for flux models"):
        generate(request("flux", guidance=method, true_cfg_scale=2.0, negative_prompt="blue"), loader=loader)


@pytest.mark.parametrize("method", ["apg", "tcfg", "cfg_zero_star"])
def test_two_prediction_methods_act_on_true_cfg(loader, method):
    """Guidance methods that mix the conditional and unconditional predictions mix true CFG's two passes."""
    cfg = generate(request("flux", true_cfg_scale=3.0, negative_prompt="blue"), loader=loader)
    other = generate(request("flux", guidance=method, true_cfg_scale=3.0, negative_prompt="blue"), loader=loader)
    assert torch.isfinite(other.latents).all() and not torch.allclose(cfg.latents, other.latents)


def test_cli_generate_takes_true_cfg_scale(tmp_path, capsys):
    """`python -m pipelines generate --true-cfg-scale` on a Flux folder (the tiny one, saved), in this process."""
    folder = tmp_path / "tiny-flux"
    tiny_pipeline("flux").save_pretrained(folder)
    out = tmp_path / "out"
    code = main(["generate", "--model", str(folder), "--prompt", "a red circle", "--negative-prompt", "blue",
                 "--true-cfg-scale", "2.5", "--guidance-scale", "3.5", "--steps", "2", "--seed", "1",
                 "--width", "32", "--height", "32", "--x0-preview", "rgb", "--out", str(out)])
    assert code in (0, None), capsys.readouterr().err
    trace = json.loads((out / "trace.json").read_text())
    assert trace["request"]["true_cfg_scale"] == 2.5 and trace["family"] == "flux"
    assert main(["generate", "--prompt", "x", "--true-cfg-scale", "2", "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "true_cfg_scale is for Flux models" in capsys.readouterr().err
