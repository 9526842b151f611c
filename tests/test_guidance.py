"""Guidance methods on random tensors: limits that must hold, agreement with diffusers' guiders, validation."""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance
from diffusers.guiders.guider_utils import rescale_noise_cfg as diffusers_rescale_noise_cfg

from guidance import registry
from guidance.base import GuidanceContext, Predictions
from guidance.cfg import cfg
from guidance.interval import in_step_range

SHAPE = (2, 4, 8, 8)  # (B, C, H, W): two images so per-image norms and scales are exercised


def preds(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A correlated (pred_cond, pred_uncond) pair, as a model's two passes are."""
    g = torch.Generator().manual_seed(seed)
    pred_uncond = torch.randn(SHAPE, generator=g)
    pred_cond = pred_uncond + 0.5 * torch.randn(SHAPE, generator=g)
    return pred_cond, pred_uncond


def ctx(step: int = 0, num_steps: int = 10, sigma: float | None = 1.0) -> GuidanceContext:
    return GuidanceContext(step=step, num_steps=num_steps, timestep=float(999 - step), sigma=sigma)


def guided(guider, step: int, num_steps: int, pred_cond: torch.Tensor, pred_uncond: torch.Tensor) -> torch.Tensor:
    """One step of a diffusers guider used standalone: set_state, prepare_inputs (resets state at step 0), forward."""
    guider.set_state(step=step, num_inference_steps=num_steps, timestep=torch.tensor(999 - step))
    guider.prepare_inputs({})
    return guider.forward(pred_cond=pred_cond, pred_uncond=pred_uncond).pred


# --- cfg and rescale ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.5, 7.5])
def test_cfg_matches_diffusers(scale: float) -> None:
    c, u = preds(0)
    ours = registry.create("cfg", scale, {})(Predictions(c, u), ctx())
    theirs = guided(ClassifierFreeGuidance(guidance_scale=scale), 0, 10, c, u)
    assert torch.equal(ours.pred, theirs)
    assert ours.effective_scale == scale


@pytest.mark.parametrize("phi", [0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(phi: float) -> None:
    c, u = preds(1)
    ours = registry.create("rescale", 7.5, {"guidance_rescale": phi})(Predictions(c, u), ctx()).pred
    torch.testing.assert_close(ours, diffusers_rescale_noise_cfg(cfg(c, u, 7.5), c, phi), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, guided(ClassifierFreeGuidance(7.5, guidance_rescale=phi), 0, 10, c, u), rtol=0, atol=1e-6)
    assert not torch.allclose(ours, cfg(c, u, 7.5))  # the rescale did something


def test_rescale_zero_is_cfg() -> None:
    c, u = preds(2)
    assert torch.equal(registry.create("rescale", 5.0, {"guidance_rescale": 0.0})(Predictions(c, u), ctx()).pred, cfg(c, u, 5.0))


@pytest.mark.parametrize("phi", [-0.1, 1.5])
def test_rescale_out_of_range_names_range(phi: float) -> None:
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        registry.validate("rescale", {"guidance_rescale": phi})


# --- interval ----------------------------------------------------------------------------------------------------


def test_interval_outside_is_cond_and_skips_uncond() -> None:
    c, u = preds(3)
    method = registry.create("interval", 7.5, {"sigma_lo": 0.5, "sigma_hi": 3.0})
    for sigma in (10.0, 3.01, 0.49, 0.0):
        assert method.needs(ctx(sigma=sigma), True) == ("cond",)  # the loop makes no unconditional pass
        out = method(Predictions(c), ctx(sigma=sigma))
        assert torch.equal(out.pred, c) and out.effective_scale == 1.0


def test_interval_inside_is_cfg() -> None:
    c, u = preds(4)
    method = registry.create("interval", 7.5, {"sigma_lo": 0.5, "sigma_hi": 3.0})
    for sigma in (0.5, 1.0, 3.0):  # closed interval: both ends guide
        assert ("uncond" in method.needs(ctx(sigma=sigma), True)) is True
        out = method(Predictions(c, u), ctx(sigma=sigma))
        assert torch.equal(out.pred, cfg(c, u, 7.5)) and out.effective_scale == 7.5


@pytest.mark.parametrize("num_steps", [1, 7, 10, 25])
@pytest.mark.parametrize(("start", "stop"), [(0.0, 1.0), (0.2, 0.8), (0.1, 0.15), (0.5, 1.0), (0.3, 0.3)])
def test_interval_step_window_matches_diffusers_start_stop(num_steps: int, start: float, stop: float) -> None:
    guider = ClassifierFreeGuidance(guidance_scale=7.5, start=start, stop=stop)
    method = registry.create("interval", 7.5, {"sigma_lo": 0.0, "sigma_hi": 1000.0, "start": start, "stop": stop})
    for step in range(num_steps):
        guider.set_state(step, num_steps, torch.tensor(0))
        assert ("uncond" in method.needs(ctx(step, num_steps, sigma=None), True)) == guider._is_cfg_enabled()
        assert in_step_range(step, num_steps, start, stop) == guider._is_cfg_enabled()


def test_interval_sigma_and_steps_both_apply() -> None:
    method = registry.create("interval", 7.5, {"sigma_lo": 0.5, "sigma_hi": 3.0, "start": 0.5})
    assert not ("uncond" in method.needs(ctx(step=2, num_steps=10, sigma=1.0), True))  # σ inside, step before start
    assert ("uncond" in method.needs(ctx(step=5, num_steps=10, sigma=1.0), True))
    assert not ("uncond" in method.needs(ctx(step=5, num_steps=10, sigma=5.0), True))  # step inside, σ above


def test_interval_needs_sigma_for_a_sigma_window() -> None:
    method = registry.create("interval", 7.5, {})
    with pytest.raises(ValueError, match="start/stop"):
        ("uncond" in method.needs(ctx(sigma=None), True))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sigma_lo": 3.0, "sigma_hi": 1.0}, "sigma_lo must be <= sigma_hi"),
        ({"start": 0.8, "stop": 0.2}, "start must be <= stop"),
        ({"stop": 1.5}, r"stop must be in \[0, 1\]"),
        ({"sigma_lo": -1.0}, r"sigma_lo must be in \[0, 1000\]"),
    ],
)
def test_interval_validation(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.validate("interval", params)


# --- apg ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("paper_form", [0, 1])
def test_apg_limit_is_cfg(paper_form: int) -> None:
    method = registry.create("apg", 7.5, {"eta": 1.0, "momentum": 0.0, "norm_threshold": 0.0, "paper_form": paper_form})
    for step in range(3):
        c, u = preds(10 + step)
        out = method(Predictions(c, u), ctx(step))
        torch.testing.assert_close(out.pred, cfg(c, u, 7.5), rtol=0, atol=1e-5)


APG_CASES = [
    dict(eta=1.0, norm_threshold=0.0, momentum=0.0),
    dict(eta=0.0, norm_threshold=0.0, momentum=0.0),
    dict(eta=0.0, norm_threshold=5.0, momentum=0.0),  # ‖Δ‖ ≈ 8 here, so r = 5 clips
    dict(eta=0.3, norm_threshold=5.0, momentum=-0.5),
    dict(eta=0.0, norm_threshold=15.0, momentum=-0.5),  # registry defaults
    dict(eta=1.0, norm_threshold=0.0, momentum=0.7),
]


@pytest.mark.parametrize("case", APG_CASES)
@pytest.mark.parametrize("paper_form", [0, 1])
def test_apg_matches_diffusers_over_steps(case: dict[str, float], paper_form: int) -> None:
    scale, num_steps = 7.5, 5
    method = registry.create("apg", scale, dict(case, paper_form=paper_form))
    # The paper's D_c + (s − 1)Δ̂ is diffusers' use_original_formulation (D_c + s'Δ̂) at s' = s − 1.
    guider = AdaptiveProjectedGuidance(
        guidance_scale=scale - 1.0 if paper_form else scale,
        adaptive_projected_guidance_momentum=case["momentum"] or None,
        adaptive_projected_guidance_rescale=case["norm_threshold"],
        eta=case["eta"],
        use_original_formulation=bool(paper_form),
    )
    for step in range(num_steps):
        c, u = preds(20 + step)
        ours = method(Predictions(c, u), ctx(step, num_steps)).pred
        torch.testing.assert_close(ours, guided(guider, step, num_steps, c, u), rtol=0, atol=1e-6)


def test_apg_parts_do_something() -> None:
    """Each of η, r and β changes the output, so the agreement tests above cannot pass by accident."""
    base = {"eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}
    c0, u0 = preds(30)
    c1, u1 = preds(31)
    reference = registry.create("apg", 7.5, base)
    ref = [reference(Predictions(c0, u0), ctx(0)).pred, reference(Predictions(c1, u1), ctx(1)).pred]
    for name, value in (("eta", 0.0), ("norm_threshold", 5.0), ("momentum", -0.5)):
        method = registry.create("apg", 7.5, base | {name: value})
        outs = [method(Predictions(c0, u0), ctx(0)).pred, method(Predictions(c1, u1), ctx(1)).pred]
        assert not torch.allclose(outs[1], ref[1], atol=1e-3), name
    assert torch.equal(outs[0], ref[0])  # momentum has nothing to average at the first step


def test_apg_fresh_state_per_run() -> None:
    runs = []
    for _ in range(2):
        method = registry.create("apg", 7.5, {"momentum": -0.5})
        runs.append([method(Predictions(*preds(40 + step)), ctx(step)).pred for step in range(4)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --- cfg_zero_star -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_init_steps", [0, 1, 2])
def test_cfg_zero_star_matches_diffusers(zero_init_steps: int) -> None:
    scale, num_steps = 5.0, 5
    method = registry.create("cfg_zero_star", scale, {"zero_init_steps": zero_init_steps})
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=scale, zero_init_steps=zero_init_steps)
    for step in range(num_steps):
        c, u = preds(50 + step)
        out = method(Predictions(c, u), ctx(step, num_steps))
        torch.testing.assert_close(out.pred, guided(guider, step, num_steps, c, u), rtol=0, atol=1e-6)
        if step < zero_init_steps:
            assert torch.equal(out.pred, torch.zeros_like(c)) and out.effective_scale == 0.0
        else:
            assert out.pred.abs().max() > 0 and out.effective_scale != scale  # s* ≠ 1 for these tensors


def orthogonal_part(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w minus its projection onto u, per image."""
    wf, uf = w.flatten(1).double(), u.flatten(1).double()
    return (wf - (wf * uf).sum(1, keepdim=True) / (uf * uf).sum(1, keepdim=True) * uf).view_as(w).float()


def test_cfg_zero_star_at_unit_optimal_scale_is_cfg() -> None:
    c, u = preds(60)
    c = u + orthogonal_part(c - u, u)  # ⟨c, u⟩ = ‖u‖², so s* = 1
    out = registry.create("cfg_zero_star", 5.0, {"zero_init_steps": 1})(Predictions(c, u), ctx(step=1))
    torch.testing.assert_close(out.pred, cfg(c, u, 5.0), rtol=0, atol=1e-4)
    assert out.effective_scale == pytest.approx(5.0, abs=1e-4)


def test_cfg_zero_star_effective_scale_at_zero_optimal_scale() -> None:
    c, u = preds(61)
    c = orthogonal_part(c, u)  # s* = 0: the unconditional prediction is dropped, v = s·v_c
    out = registry.create("cfg_zero_star", 5.0, {"zero_init_steps": 0})(Predictions(c, u), ctx())
    torch.testing.assert_close(out.pred, 5.0 * c, rtol=0, atol=1e-4)
    assert out.effective_scale == pytest.approx(1.0, abs=1e-4)


def test_cfg_zero_star_steps_must_be_whole() -> None:
    with pytest.raises(ValueError, match=r"zero_init_steps must be a whole number in \[0, 1000\]"):
        registry.validate("cfg_zero_star", {"zero_init_steps": 1.5})
    assert registry.validate("cfg_zero_star", {"zero_init_steps": 2.0}) == {"zero_init_steps": 2}


# --- registry ----------------------------------------------------------------------------------------------------


def test_unknown_method_lists_methods() -> None:
    with pytest.raises(ValueError, match="choose one of: cfg, rescale, interval, apg, cfg_zero_star, pag"):
        registry.validate("cfg_plus_plus", {})


def test_unknown_param_lists_params() -> None:
    with pytest.raises(ValueError, match="its parameters: eta, norm_threshold, momentum, paper_form"):
        registry.validate("apg", {"adaptive_projected_guidance_momentum": -0.5})
    with pytest.raises(ValueError, match="its parameters: none"):
        registry.validate("cfg", {"guidance_rescale": 0.5})


@pytest.mark.parametrize("key", list(registry.METHODS))
def test_every_method_runs_with_defaults(key: str) -> None:
    spec = registry.METHODS[key]
    full = registry.validate(key, {})
    assert full == {p.name: p.default for p in spec.params}
    for p in spec.params:
        assert p.low <= p.default <= p.high and p.doc
    c, u = preds(70)
    out = combine(registry.create(key, 7.5, {}), c, u, ctx(step=3, sigma=1.0))
    assert out.pred.shape == SHAPE and torch.isfinite(out.pred).all()


def combine(method, c, u, context):
    """Call a method as the loop does: the predictions it asks for, by name (a perturbed one is 0.9·c here)."""
    names = method.needs(context, True)
    given = {"uncond": u, "cond": c, "perturbed": 0.9 * c}
    return method(Predictions(**{k: given[k] for k in names}), context)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key", list(registry.METHODS))
def test_half_precision_keeps_dtype(key: str, dtype: torch.dtype) -> None:
    c, u = (t.to(dtype) for t in preds(71))
    out = combine(registry.create(key, 7.5, {}), c, u, ctx(step=3, sigma=1.0))
    assert out.pred.dtype == dtype and torch.isfinite(out.pred).all()


def test_apg_half_precision_matches_diffusers() -> None:
    method = registry.create("apg", 7.5, {})
    guider = AdaptiveProjectedGuidance(7.5, adaptive_projected_guidance_momentum=-0.5, eta=0.0)
    for step in range(3):
        c, u = (t.to(torch.bfloat16) for t in preds(72 + step))
        assert torch.equal(method(Predictions(c, u), ctx(step, 3)).pred, guided(guider, step, 3, c, u))


def test_describe_lists_methods_params_and_papers() -> None:
    text = registry.describe()
    for spec in registry.METHODS.values():
        assert spec.key in text and spec.paper in text
        for p in spec.params:
            assert p.name in text
    assert "eta = 0  (number in [0, 1])" in text


def test_pag_limits() -> None:
    from guidance.pag import PAG, pag_scale_at

    g = torch.Generator().manual_seed(0)
    cond, uncond, ptb = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    ctx = GuidanceContext(step=0, num_steps=10, timestep=900.0, sigma=5.0)
    # pag_scale 0 is plain CFG; without CFG it is the conditional prediction.
    torch.testing.assert_close(PAG(5.0, pag_scale=0.0)(Predictions(cond, uncond, ptb), ctx).pred,
                               cfg(cond, uncond, 5.0), rtol=0, atol=0)
    torch.testing.assert_close(PAG(1.0, pag_scale=0.0)(Predictions(cond, None, ptb), ctx).pred, cond, rtol=0, atol=0)
    out = PAG(1.0, pag_scale=2.0)(Predictions(cond, None, ptb), ctx)
    torch.testing.assert_close(out.pred, cond + 2.0 * (cond - ptb))
    assert out.effective_scale == 1.0
    # Adaptive: decays linearly from t = 1000 and never goes negative (diffusers' _get_pag_scale).
    assert pag_scale_at(3.0, 0.01, 1000.0) == 3.0
    assert pag_scale_at(3.0, 0.01, 900.0) == pytest.approx(2.0)
    assert pag_scale_at(3.0, 0.01, 100.0) == 0.0
    assert "perturbed" in PAG.uses and "perturbed" not in registry.create("cfg", 5.0, {}).uses
    assert PAG(5.0).needs(ctx, True) == ("uncond", "cond", "perturbed") and PAG(1.0).needs(ctx, False) == ("cond", "perturbed")
    with pytest.raises(ValueError, match=r"pag_scale must be in \[0, 100\]"):
        registry.validate("pag", {"pag_scale": -1})
