"""Every guidance method against the diffusers guider it names (registry `diffusers`), on the same random tensors and,
for the ones with state or a step window, over several steps; the perturbed passes (PAG, SLG, SEG, autoguidance)
on tiny real models; and every method through generate() on the tiny SD and SD3 pipelines."""

from __future__ import annotations

import json

from diffusers import guiders
import numpy as np
import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import LayerSkipConfig, _apply_layer_skip_hook
from diffusers.hooks.smoothed_energy_guidance_utils import (
    SmoothedEnergyGuidanceConfig,
    _apply_smoothed_energy_guidance_hook,
    _gaussian_blur_2d,
)

from guidance import registry
from guidance.base import PREDICTIONS, GuidanceContext, Perturbation, Predictions
from guidance.fdg import image_from_pyramid, laplacian_pyramid
from guidance.seg import BLUR_THRESHOLD_INF, blur_query
from pipelines.__main__ import main
from pipelines.families import FAMILIES, Family
from pipelines.generate import generate
from pipelines.observers import CollectingObserver
from pipelines.types import GenerationRequest
from tests.tiny import TINY_SIZE, tiny_pipeline

STEPS = 10


def _preds(shape: tuple[int, ...] = (2, 4, 16, 16), seed: int = 0) -> dict[str, torch.Tensor]:
    """Random cond / uncond / perturbed predictions, cond correlated with uncond as a model's are."""
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(shape, generator=g)
    cond = uncond + 0.5 * torch.randn(shape, generator=g)
    return {"uncond": uncond, "cond": cond, "perturbed": cond + 0.3 * torch.randn(shape, generator=g)}


def ours_at(method, preds: dict[str, torch.Tensor], step: int, cfg: bool = True, steps: int = STEPS) -> torch.Tensor:
    """One step of our method as the loop runs it: the predictions it asks for; a cond-only step is the cond."""
    ctx = GuidanceContext(step=step, num_steps=steps, timestep=float(999 - 100 * step), sigma=1.0)
    names = method.needs(ctx, cfg)
    assert names == tuple(n for n in PREDICTIONS if n in names)
    if names == ("cond",):
        return preds["cond"]
    return method(Predictions(**{n: preds[n] for n in names}), ctx).pred


def theirs_at(guider, step: int, steps: int = STEPS, **inputs: torch.Tensor) -> torch.Tensor:
    guider.set_state(step, steps, torch.tensor(999 - 100 * step))
    return guider.forward(**inputs).pred


def test_every_method_names_the_guider_it_agrees_with():
    assert {spec.key: spec.diffusers for spec in registry.METHODS.values()} == {
        "cfg": "ClassifierFreeGuidance", "rescale": "ClassifierFreeGuidance", "interval": "ClassifierFreeGuidance",
        "apg": "AdaptiveProjectedGuidance", "cfg_zero_star": "ClassifierFreeZeroStarGuidance",
        "pag": "PerturbedAttentionGuidance", "slg": "SkipLayerGuidance", "seg": "SmoothedEnergyGuidance",
        "autoguidance": "AutoGuidance", "tcfg": "TangentialClassifierFreeGuidance", "fdg": "FrequencyDecoupledGuidance",
        "mambo_g": "MagnitudeAwareGuidance", "apg_mix": "AdaptiveProjectedMixGuidance",
    }
    for spec in registry.METHODS.values():
        assert hasattr(guiders, spec.diffusers), spec.diffusers


def test_guidance_json_lists_every_method(capsys):
    assert main(["guidance", "--json"]) in (0, None)
    listed = json.loads(capsys.readouterr().out)
    assert [m["key"] for m in listed] == list(registry.METHODS)
    assert all(set(m) == {"key", "diffusers", "params", "paper"} for m in listed)
    slg = next(m for m in listed if m["key"] == "slg")
    assert slg["diffusers"] == "SkipLayerGuidance" and "arXiv" in slg["paper"]
    assert [p["name"] for p in slg["params"]] == ["skip_layer_guidance_scale", "skip_layer_guidance_start",
                                                  "skip_layer_guidance_stop"]


# --- CFG and its options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.5, 7.5])
def test_cfg_agrees(scale):
    p = _preds()
    theirs = theirs_at(guiders.ClassifierFreeGuidance(guidance_scale=scale), 0, pred_cond=p["cond"],
                       pred_uncond=p["uncond"])
    torch.testing.assert_close(ours_at(registry.create("cfg", scale, {}), p, 0), theirs, rtol=0, atol=0)


def test_rescale_agrees_with_cfg_guidance_rescale():
    p = _preds()
    guider = guiders.ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=0.7)
    ours = ours_at(registry.create("rescale", 6.0, {"guidance_rescale": 0.7}), p, 0)
    torch.testing.assert_close(ours, theirs_at(guider, 0, pred_cond=p["cond"], pred_uncond=p["uncond"]))


def test_interval_with_open_sigma_bounds_agrees_with_cfg_start_stop():
    """Our interval's step window is diffusers' CFG start/stop (the σ interval, opened here, is ours alone)."""
    from guidance.interval import SIGMA_MAX

    params = {"sigma_lo": 0.0, "sigma_hi": SIGMA_MAX, "start": 0.2, "stop": 0.7}
    ours, guider = registry.create("interval", 5.0, params), guiders.ClassifierFreeGuidance(5.0, start=0.2, stop=0.7)
    guided = 0
    for step in range(STEPS):
        p = _preds(seed=step)
        expected = theirs_at(guider, step, pred_cond=p["cond"], pred_uncond=p["uncond"])
        torch.testing.assert_close(ours_at(ours, p, step), expected, rtol=0, atol=0)
        guided += not torch.equal(expected, p["cond"])
    assert guided == 5  # steps 2..6: the window is really there


# --- projections, momentum, optimized scale --------------------------------------------------------------------------

@pytest.mark.parametrize("momentum,eta,r", [(0.0, 1.0, 15.0), (-0.5, 0.0, 15.0), (0.3, 0.5, 2.0)])
def test_apg_agrees_over_steps(momentum, eta, r):
    ours = registry.create("apg", 7.5, {"momentum": momentum, "eta": eta, "norm_threshold": r})
    guider = guiders.AdaptiveProjectedGuidance(
        guidance_scale=7.5, adaptive_projected_guidance_momentum=momentum or None,
        adaptive_projected_guidance_rescale=r, eta=eta)
    guider.momentum_buffer = MomentumBuffer(momentum) if momentum else None  # what its prepare_inputs makes at step 0
    for step in range(4):  # the momentum buffers must advance alike
        p = _preds(seed=step)
        expected = theirs_at(guider, step, pred_cond=p["cond"], pred_uncond=p["uncond"])
        torch.testing.assert_close(ours_at(ours, p, step), expected)


def test_cfg_zero_star_agrees_over_steps():
    ours = registry.create("cfg_zero_star", 4.0, {"zero_init_steps": 2})
    guider = guiders.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=2)
    for step in range(4):
        p = _preds(seed=step)
        expected = theirs_at(guider, step, pred_cond=p["cond"], pred_uncond=p["uncond"])
        torch.testing.assert_close(ours_at(ours, p, step), expected, rtol=0, atol=0)
    assert torch.count_nonzero(ours_at(ours, _preds(), 1)) == 0  # zero-init really tested


def test_apg_mix_agrees_over_steps():
    params = {"adaptive_projected_guidance_scale": 6.0, "adaptive_projected_guidance_momentum": -0.5,
              "adaptive_projected_guidance_rescale": 4.0, "eta": 0.2, "adaptive_projected_guidance_start_step": 3}
    ours = registry.create("apg_mix", 3.5, params)
    guider = guiders.AdaptiveProjectedMixGuidance(guidance_scale=3.5, **params)
    guider.momentum_buffer = MomentumBuffer(-0.5)  # what its prepare_inputs makes at step 0
    for step in range(STEPS):  # CFG on steps 0-3 (momentum warming up), APG after
        p = _preds(seed=step)
        expected = theirs_at(guider, step, pred_cond=p["cond"], pred_uncond=p["uncond"])
        torch.testing.assert_close(ours_at(ours, p, step), expected)
    cfg_like = p["uncond"] + 3.5 * (p["cond"] - p["uncond"])
    assert not torch.allclose(ours_at(registry.create("apg_mix", 3.5, params), p, 9), cfg_like)


def test_tcfg_agrees():
    p = _preds()
    guider = guiders.TangentialClassifierFreeGuidance(guidance_scale=6.0)
    expected = theirs_at(guider, 0, pred_cond=p["cond"], pred_uncond=p["uncond"])
    torch.testing.assert_close(ours_at(registry.create("tcfg", 6.0, {}), p, 0), expected)
    assert not torch.allclose(expected, p["uncond"] + 6.0 * (p["cond"] - p["uncond"]))  # not plain CFG


@pytest.mark.parametrize("alpha", [0.0, 0.5, 8.0])
def test_mambo_g_agrees(alpha):
    """On (B, L, D) predictions: diffusers' guider takes a Frobenius norm over dims 1.., which torch 2.13 only
    computes for two of them (our vector norm is the same number, and takes a (B, C, H, W) latent too)."""
    p = _preds((2, 64, 16))
    guider = guiders.MagnitudeAwareGuidance(guidance_scale=9.0, alpha=alpha)
    expected = theirs_at(guider, 0, pred_cond=p["cond"], pred_uncond=p["uncond"])
    torch.testing.assert_close(ours_at(registry.create("mambo_g", 9.0, {"alpha": alpha}), p, 0), expected)
    latent = _preds()
    assert torch.isfinite(ours_at(registry.create("mambo_g", 9.0, {}), latent, 0)).all()


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 16, 32, 24)])
@pytest.mark.parametrize("low,parallel_weight", [(5.0, 1.0), (0.5, 1.0), (2.0, 0.3)])
def test_fdg_agrees(shape, low, parallel_weight):
    pytest.importorskip("kornia")  # diffusers' FrequencyDecoupledGuidance needs it; ours does not
    p = _preds(shape)
    guider = guiders.FrequencyDecoupledGuidance(guidance_scales=[10.0, low], parallel_weights=parallel_weight)
    expected = theirs_at(guider, 0, pred_cond=p["cond"], pred_uncond=p["uncond"])
    ours = registry.create("fdg", 10.0, {"guidance_scale_low": low, "parallel_weight": parallel_weight})
    torch.testing.assert_close(ours_at(ours, p, 0), expected)


def test_fdg_band_at_scale_one_keeps_the_cond_band():
    """A band at w = 1 keeps ε_c's band (diffusers 0.42.1 means to, but appends the previous level's cond band, whose
    shape does not fit: its guider raises there); the result is then CFG at w ≈ 1 on that band."""
    p = _preds()
    at_one = registry.create("fdg", 10.0, {"guidance_scale_low": 1.0})
    near_one = registry.create("fdg", 10.0, {"guidance_scale_low": 1.0 + 1e-6})
    torch.testing.assert_close(ours_at(at_one, p, 0), ours_at(near_one, p, 0))


def test_fdg_takes_odd_latent_sides():
    """Padded by reflection for the pyramid and cropped back: guided where the bands differ, CFG where all agree."""
    p = _preds((1, 4, 15, 9))
    guided = ours_at(registry.create("fdg", 6.0, {"guidance_scale_low": 2.0}), p, 0)
    assert guided.shape == p["cond"].shape and torch.isfinite(guided).all()
    as_cfg = ours_at(registry.create("fdg", 6.0, {"guidance_scale_low": 6.0}), p, 0)
    torch.testing.assert_close(as_cfg, p["uncond"] + 6.0 * (p["cond"] - p["uncond"]), rtol=1e-4, atol=1e-4)


def test_laplacian_pyramid_inverts_and_refuses_odd_sizes():
    x = torch.randn(1, 4, 16, 8)
    torch.testing.assert_close(image_from_pyramid(laplacian_pyramid(x, 3)), x)
    with pytest.raises(ValueError, match="divisible by 2"):
        laplacian_pyramid(torch.randn(1, 4, 15, 16), 2)


# --- methods with a perturbed pass: the combination --------------------------------------------------------------------

def test_pag_agrees_with_the_guider_where_both_perturb():
    """diffusers' PerturbedAttentionGuidance shares SLG's window and no-CFG form; ours follows the PAG pipelines
    (every step; ε_c + s_pag(ε_c − ε_ptb) without CFG: tests/test_parity.py). With CFG inside the window they agree."""
    p = _preds()
    guider = guiders.PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0,
                                                  perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                                  perturbed_guidance_layers=[1])
    expected = theirs_at(guider, 3, pred_cond=p["cond"], pred_uncond=p["uncond"], pred_cond_skip=p["perturbed"])
    ours = ours_at(registry.create("pag", 5.0, {"pag_scale": 3.0}), p, 3)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("key,guider_cls,prefix", [("slg", guiders.SkipLayerGuidance, "skip_layer_guidance"),
                                                   ("seg", guiders.SmoothedEnergyGuidance, "seg_guidance")])
@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_windowed_perturbed_guidance_agrees_over_steps(key, guider_cls, prefix, scale):
    """SLG and SEG over a run: the same steps get the perturbed pass, with CFG and without it (scale 1)."""
    params = {f"{prefix}_scale": 2.5, f"{prefix}_start": 0.1, f"{prefix}_stop": 0.6}
    layers = {"skip_layer_guidance_layers": [1]} if key == "slg" else {"seg_guidance_layers": [1]}
    guider = guider_cls(guidance_scale=scale, **params, **layers)
    ours = registry.create(key, scale, params)
    extra = "pred_cond_skip" if key == "slg" else "pred_cond_seg"
    perturbed_steps = []
    for step in range(STEPS):
        p = _preds(seed=step)
        expected = theirs_at(guider, step, pred_cond=p["cond"], pred_uncond=p["uncond"], **{extra: p["perturbed"]})
        torch.testing.assert_close(ours_at(ours, p, step, cfg=scale > 1), expected, rtol=0, atol=0)
        ctx = GuidanceContext(step=step, num_steps=STEPS, timestep=0.0, sigma=None)
        if "perturbed" in ours.needs(ctx, scale > 1):
            perturbed_steps.append(step)
    assert perturbed_steps == [2, 3, 4, 5]  # int(0.1·10) < step < int(0.6·10), as diffusers


def test_autoguidance_agrees():
    """diffusers' AutoGuidance combines (cond, weak) as CFG does (forward(pred_cond, pred_uncond=weak))."""
    p = _preds()
    guider = guiders.AutoGuidance(guidance_scale=3.0, auto_guidance_layers=[1], dropout=1.0)
    expected = theirs_at(guider, 0, pred_cond=p["cond"], pred_uncond=p["perturbed"])
    method = registry.create("autoguidance", 3.0, {})
    assert method.needs(GuidanceContext(0, STEPS, 999.0, 1.0), True) == ("cond", "perturbed")
    torch.testing.assert_close(ours_at(method, p, 0), expected, rtol=0, atol=0)


def test_seg_query_blur_matches_each_branch_of_diffusers():
    """diffusers 0.42.1 swaps SEG's branches (mean below the threshold, a clipped Gaussian above); each of ours
    computes what the diffusers branch of the same kind computes."""
    q = torch.randn(3, 64 + 5, 8)  # an 8×8 image plus 5 other tokens
    torch.testing.assert_close(blur_query(q, 1e7), _gaussian_blur_2d(q.clone(), 7, 1.0, BLUR_THRESHOLD_INF))
    for sigma in (1.0, 2.5):  # our Gaussian branch against theirs, reached in diffusers only above its threshold
        kernel = int(np.ceil(6 * sigma)) + 1 - int(np.ceil(6 * sigma)) % 2
        torch.testing.assert_close(blur_query(q, sigma, threshold_inf=1e9),
                                   _gaussian_blur_2d(q.clone(), kernel, sigma, sigma_threshold_inf=sigma / 2))
    assert torch.equal(blur_query(q, 1.0)[:, 64:], q[:, 64:])  # tokens past the square untouched


# --- the perturbed pass itself, on tiny real models -------------------------------------------------------------------

def _denoiser_call(family: str, pipe):
    """A batched call [uncond, cond, perturbed] of the family's denoiser on random inputs: f(batch parts) -> output."""
    g = torch.Generator().manual_seed(1)
    fam = FAMILIES[family]
    model = fam.denoiser(pipe)
    size = TINY_SIZE[family] // pipe.vae_scale_factor
    latents = torch.randn(1, fam.latent_channels(pipe), size, size, generator=g)
    cond = fam.encode(pipe, "a red circle", None, True, torch.device("cpu"), TINY_SIZE[family], TINY_SIZE[family])
    t = torch.tensor(500.0) if family == "sd3" else torch.tensor(500)

    def call(with_uncond: bool, perturbed: bool) -> torch.Tensor:
        copies = 1 + with_uncond + perturbed
        return fam.predict(pipe, torch.cat([latents] * copies), t, cond, with_uncond, 5.0, perturbed)

    return fam, model, call


def _diffusers_blocks(family: str, pipe) -> tuple[torch.nn.Module, str]:
    """(module, fqn) of the block stack diffusers' hooks take, for the blocks our family picks."""
    if family == "sd":
        return pipe.unet, "mid_block.attentions.0.transformer_blocks"
    return pipe.transformer, "transformer_blocks"


@pytest.mark.parametrize("family", ["sd", "pixart_sigma", "sd3"])
@pytest.mark.parametrize("kind", ["skip_blocks", "blur_query"])
def test_perturbed_pass_perturbs_only_its_part(family, kind):
    """The uncond and cond parts of a batched call with the perturbed pass installed equal a plain call's; the
    perturbed part differs from the cond part; and the hooks are gone afterwards."""
    pipe = tiny_pipeline(family)
    fam, model, call = _denoiser_call(family, pipe)
    with torch.no_grad():
        plain = call(True, False)
        with fam.perturbed_pass(pipe, Perturbation(kind, blur_sigma=1e7)) as perturbed:
            with perturbed.install(3):
                out = call(True, True)
        again = call(True, False)
    u, c, ptb = out.chunk(3)
    torch.testing.assert_close(torch.cat([u, c]), plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ptb, c, atol=1e-4)
    assert torch.equal(again, plain)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["sd", "pixart_sigma"])
def test_skip_pass_equals_diffusers_layer_skip_hook(family):
    """Our batched skip pass against diffusers' TransformerBlockSkipHook on a separate cond pass, where that hook
    returns outputs in the block's order (a single tensor: UNet and PixArt blocks)."""
    pipe = tiny_pipeline(family)
    fam, model, call = _denoiser_call(family, pipe)
    blocks = fam.guidance_blocks(pipe)
    module, fqn = _diffusers_blocks(family, pipe)
    stack = module.get_submodule(fqn)
    indices = [i for i, b in enumerate(stack) if any(b is x for x in blocks)]
    assert len(indices) == len(blocks) >= 1
    with torch.no_grad():
        with fam.perturbed_pass(pipe, Perturbation("skip_blocks")) as perturbed, perturbed.install(2):
            ours = call(False, True).chunk(2)[1]
        _apply_layer_skip_hook(module, LayerSkipConfig(indices, fqn=fqn), name="slg_test")
        try:
            theirs = call(False, False)
        finally:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook("slg_test", recurse=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_sd3_skip_pass_hands_each_stream_through():
    """SD3's joint blocks return (text, image); a skipped block hands both of its inputs on unchanged (diffusers'
    0.42.1 hook returns them as (image, text), which the next block reads the wrong way round)."""
    pipe = tiny_pipeline("sd3")
    fam, model, call = _denoiser_call("sd3", pipe)
    (block,) = fam.guidance_blocks(pipe)
    seen = {}

    def before(module, args, kwargs):
        seen["in"] = kwargs["hidden_states"]

    def after(module, args, kwargs, output):
        seen["out"] = output

    handles = [block.register_forward_pre_hook(before, with_kwargs=True)]
    with torch.no_grad(), fam.perturbed_pass(pipe, Perturbation("skip_blocks")) as perturbed:
        with perturbed.install(2):
            handles.append(block.register_forward_hook(after, with_kwargs=True))  # runs after ours
            call(False, True)
    for h in handles:
        h.remove()
    encoder_out, hidden_out = seen["out"]
    assert torch.equal(hidden_out[1:], seen["in"][1:])  # the perturbed row: the block's input
    assert not torch.equal(hidden_out[:1], seen["in"][:1])  # the cond row: the block ran


@pytest.mark.parametrize("family", ["sd", "pixart_sigma", "sd3"])
def test_blur_pass_equals_diffusers_seg_hook(family):
    """Our batched blurred-query pass against diffusers' SEG hook on a separate cond pass. Infinite blur (the mean
    query) here is diffusers' finite-σ branch (see test_seg_query_blur_matches_each_branch_of_diffusers)."""
    pipe = tiny_pipeline(family)
    fam, model, call = _denoiser_call(family, pipe)
    blocks = fam.guidance_blocks(pipe)
    module, fqn = _diffusers_blocks(family, pipe)
    indices = [i for i, b in enumerate(module.get_submodule(fqn)) if any(b is x for x in blocks)]
    with torch.no_grad():
        with fam.perturbed_pass(pipe, Perturbation("blur_query", blur_sigma=1e7)) as perturbed, perturbed.install(2):
            ours = call(False, True).chunk(2)[1]
        _apply_smoothed_energy_guidance_hook(module, SmoothedEnergyGuidanceConfig(indices, fqn=fqn), 1.0, name="seg")
        try:
            theirs = call(False, False)
        finally:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook("seg", recurse=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_families_without_guidance_blocks_refuse_with_the_families_that_have_them():
    with pytest.raises(ValueError, match="not available for .* models; they run on: sd, sdxl, pixart_sigma, sd3"):
        Family().guidance_blocks(None)


# --- end to end: every method through generate() ------------------------------------------------------------------

# Parameters that make each method differ from plain CFG in a 4-step run (SLG's default window is empty at 4 steps:
# int(0.01·4) < i < int(0.2·4); FDG at w_low = s is CFG; APG-mix turns to APG after step 1 here).
E2E_PARAMS = {
    "slg": {"skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0},
    "fdg": {"guidance_scale_low": 1.5},
    "apg_mix": {"adaptive_projected_guidance_start_step": 1},
    "interval": {"start": 0.5},
}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_every_method_runs_through_generate_and_differs_from_cfg(tiny_loader, family):
    base = dict(prompt="a red circle", model=family, num_inference_steps=4, guidance_scale=5.0, seed=3,
                width=TINY_SIZE[family], height=TINY_SIZE[family])
    plain = generate(GenerationRequest(**base), loader=tiny_loader)
    for key in registry.METHODS:
        observer = CollectingObserver()
        result = generate(GenerationRequest(**base, guidance=key, guidance_params=E2E_PARAMS.get(key, {})), observer,
                          loader=tiny_loader)
        assert torch.isfinite(result.latents).all(), key
        assert result.steps_completed == result.num_steps == plain.num_steps, key
        if key != "cfg":
            assert not torch.equal(result.latents, plain.latents), key
        # cond/uncond as the dissection reads them: the unconditional part where the method asked for it
        uses_uncond = "uncond" in registry.create(key, 5.0, {}).uses
        assert any(e.denoised_uncond is not None for e in observer.events) == uses_uncond, key
    again = generate(GenerationRequest(**base), loader=tiny_loader)
    assert torch.equal(again.latents, plain.latents)  # no hook or processor left behind


def test_perturbed_methods_keep_cond_and_uncond_unperturbed_for_the_dissection(tiny_loader):
    """The first perturbed step sees CFG's x_t: a method's cond/uncond x̂0 there are plain CFG's, perturbed pass or not."""
    base = dict(prompt="a red circle", model="sd3", num_inference_steps=3, guidance_scale=5.0, seed=4,
                width=TINY_SIZE["sd3"], height=TINY_SIZE["sd3"])
    plain = CollectingObserver()
    generate(GenerationRequest(**base), plain, loader=tiny_loader)
    for key in ("pag", "slg", "seg"):
        observer = CollectingObserver()
        params = {"skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0} if key == "slg" else {}
        generate(GenerationRequest(**base, guidance=key, guidance_params=params), observer, loader=tiny_loader)
        i = 0 if key == "pag" else 1  # SLG's and SEG's windows start after step 0, so step 1 still sees CFG's x_t
        first, ref = observer.events[i], plain.events[i]
        torch.testing.assert_close(first.denoised_cond, ref.denoised_cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first.denoised_uncond, ref.denoised_uncond, rtol=1e-5, atol=1e-5)


def _sd3_shaped(**transformer: object):
    """The tiny SD3 pipeline with another transformer: one block, or SD3.5's dual attention and qk-norm."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    config = dict(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                  caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(**(tiny_pipeline("sd3").components
                                       | {"transformer": SD3Transformer2DModel(**(config | transformer))}))


@pytest.mark.parametrize("shape", [{"num_layers": 1},
                                   {"num_layers": 12, "dual_attention_layers": (0, 1, 8), "qk_norm": "rms_norm"}])
def test_perturbed_methods_run_on_other_sd3_shapes(shape):
    """A one-block SD3 (no diffusers default PAG layer: its only block) and an SD3.5-shaped one (blocks 7-9, one with
    a second, image-only self-attention that takes the plain PAG processor)."""
    from pipelines.loading import ModelLoader

    pipe = _sd3_shaped(**shape)
    blocks = FAMILIES["sd3"].guidance_blocks(pipe)
    stack = list(pipe.transformer.transformer_blocks)
    assert [stack.index(b) for b in blocks] == ([0] if shape["num_layers"] == 1 else [7, 8, 9])
    loader = ModelLoader(device="cpu")
    loader.add("sd3_shape", pipe)
    base = dict(prompt="a red circle", model="sd3_shape", num_inference_steps=3, guidance_scale=5.0, seed=2,
                width=32, height=32, guidance_params={})
    plain = generate(GenerationRequest(**base, guidance="cfg"), loader=loader)
    for key in ("pag", "slg", "seg", "autoguidance"):
        params = {"skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0} if key == "slg" else {}
        result = generate(GenerationRequest(**(base | {"guidance_params": params}), guidance=key), loader=loader)
        assert torch.isfinite(result.latents).all() and not torch.equal(result.latents, plain.latents), key


def test_sweep_and_dissection_cover_every_method(tiny_loader):
    """The sweep's guidance axis takes every registered method; the dissection splits cond / uncond right for a
    method with a perturbed pass (its cond x̂0 is the one generate() hands on, not the perturbed one)."""
    from pipelines import explain

    base = GenerationRequest(prompt="a red circle", model="sd3", num_inference_steps=2, guidance_scale=5.0, seed=6,
                             width=TINY_SIZE["sd3"], height=TINY_SIZE["sd3"])
    axis = explain.parse_axis("guidance=" + ",".join(registry.METHODS))
    report = explain.finish(explain.sweep(base, axis, loader=tiny_loader))
    assert [c.request.guidance for c in report.cells] == list(registry.METHODS)
    assert all(c.result.steps_completed == 2 for c in report.cells)
    req = GenerationRequest(**(base.to_dict() | {"guidance": "pag", "guidance_params": {}}))
    dissection = explain.finish(explain.dissect(req, loader=tiny_loader))
    observer = CollectingObserver()
    generate(req, observer, loader=tiny_loader)
    assert all(s.guided and s.x0_cond is not None for s in dissection.steps)
    assert [s.guidance_delta_norm for s in dissection.steps] == [e.guidance_delta_norm for e in observer.events]
