"""Explicit registry of guidance methods: key -> constructor, parameters with defaults and ranges, paper."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

from guidance import apg, apg_mix, cfg_zero_star, fdg, interval, mambo, seg, slg
from guidance.apg import APG
from guidance.apg_mix import APGMix
from guidance.autoguidance import AutoGuidance
from guidance.base import GuidanceMethod
from guidance.cfg import CFG
from guidance.cfg_zero_star import CFGZeroStar
from guidance.fdg import FDG
from guidance.interval import Interval, check_interval
from guidance.mambo import MamboG
from guidance.pag import PAG
from guidance.rescale import Rescale
from guidance.seg import SEG
from guidance.slg import SLG, check_window
from guidance.tcfg import TCFG


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a method."""

    name: str  # keyword passed to the method's constructor (diffusers' name where it has one)
    default: float  # value used when the request does not set it
    low: float  # smallest allowed value (inclusive)
    high: float  # largest allowed value (inclusive); math.inf for unbounded
    doc: str  # one line for --help, the UI and `python -m pipelines guidance`
    integer: bool = False  # only whole numbers allowed (a step count, or 0/1 for a switch); passed on as int
    # Default per model prediction type where it differs from `default`, e.g. {"flow": 1}; see default_at().
    default_for: Mapping[str, float] = field(default_factory=dict)

    def default_at(self, prediction_type: str | None) -> float:
        """The default for a model of this prediction type; `default` when the type is unknown (None)."""
        return self.default_for.get(prediction_type, self.default) if prediction_type is not None else self.default


# What a denoiser predicts: the scheduler config's prediction_type, or "flow" for flow matching (pipelines/families.py).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass(frozen=True)
class MethodSpec:
    """A registered guidance method."""

    key: str  # registry key used by requests, the CLI and the UI
    factory: Callable[..., GuidanceMethod]  # called as factory(guidance_scale=s, **params), once per run
    params: tuple[Param, ...]  # tunable parameters
    paper: str  # citation
    summary: str  # one line: what it does
    check: Callable[[dict[str, float]], None] | None = None  # cross-parameter rule on the full set; raises ValueError
    # The diffusers guider class this method agrees with numerically (tests/test_guiders.py), or None.
    diffusers: str | None = None


METHODS: dict[str, MethodSpec] = {
    "cfg": MethodSpec(
        "cfg", CFG, (), "Ho & Salimans 2022, arXiv 2207.12598", "ε_u + s(ε_c − ε_u); scale ≤ 1 skips the unconditional pass",
        diffusers="ClassifierFreeGuidance",
    ),
    "rescale": MethodSpec(
        "rescale",
        Rescale,
        (Param("guidance_rescale", 0.7, 0.0, 1.0, "φ: mix of the std-rescaled CFG output (0 = plain CFG)"),),
        "Lin et al. 2023, arXiv 2305.08891",
        "CFG rescaled to the std of ε_c, mixed by φ; fights over-exposure at high scales",
        diffusers="ClassifierFreeGuidance",  # its guidance_rescale
    ),
    "interval": MethodSpec(
        "interval",
        Interval,
        (
            Param("sigma_lo", interval.SIGMA_LO, 0.0, interval.SIGMA_MAX, "guide only while σ >= sigma_lo (0 = no lower bound)"),
            Param(
                "sigma_hi",
                interval.SIGMA_HI,
                0.0,
                interval.SIGMA_MAX,
                f"guide only while σ <= sigma_hi ({interval.SIGMA_MAX:g} = no upper bound); k-diffusion σ, or flow σ for flow models",
            ),
            Param("start", 0.0, 0.0, 1.0, "guide from this fraction of the run on (step >= int(start·N))"),
            Param("stop", 1.0, 0.0, 1.0, "guide up to this fraction of the run (step < int(stop·N))"),
        ),
        "Kynkäänniemi et al. 2024, arXiv 2404.07724",
        "CFG only inside a σ interval and a step window, cond-only (one pass) elsewhere; default σ ∈ [0.28, 5.42] (SD-XL)",
        check_interval,
        "ClassifierFreeGuidance",  # its start/stop; the σ interval is ours (open bounds: exactly diffusers' window)
    ),
    "apg": MethodSpec(
        "apg",
        APG,
        (
            Param("eta", apg.ETA, 0.0, 1.0, "η: weight of the update's part parallel to the cond prediction (1 = keep it)"),
            Param("norm_threshold", apg.NORM_THRESHOLD, 0.0, 1000.0, "r: clip the update's L2 norm to r (0 = no clipping)"),
            Param("momentum", apg.MOMENTUM, -1.0, 1.0, "β: running average Δ̄ ← Δ + βΔ̄ of the update (0 = none)"),
            Param("paper_form", 0, 0, 1, "0: diffusers' D_u + s·Δ̂; 1: the paper's D_c + (s−1)·Δ̂", integer=True),
        ),
        "Sadat et al. 2024, arXiv 2410.02416",
        "CFG update norm-clipped, its part parallel to the cond prediction down-weighted, with momentum",
        diffusers="AdaptiveProjectedGuidance",
    ),
    "cfg_zero_star": MethodSpec(
        "cfg_zero_star",
        CFGZeroStar,
        (
            Param(
                "zero_init_steps",
                cfg_zero_star.ZERO_INIT_STEPS,
                0,
                1000,
                "number of first steps whose prediction is zeroed (0 = none); flow models only: on ε/v models a zero "
                "prediction means 'x_t is clean' and leaves noise",
                integer=True,
                default_for={"flow": cfg_zero_star.ZERO_INIT_STEPS_FLOW},
            ),
        ),
        "Fan et al. 2025, arXiv 2503.18886",
        "uncond prediction scaled by s* = <v_c, v_u>/|v_u|², then CFG; on flow models the first step is zeroed",
        diffusers="ClassifierFreeZeroStarGuidance",
    ),
    "pag": MethodSpec(
        "pag",
        PAG,
        (
            Param("pag_scale", 3.0, 0.0, 100.0, "s_pag: push away from the identity-self-attention prediction (0 = CFG)"),
            Param("pag_adaptive_scale", 0.0, 0.0, 1.0, "a: s_pag(t) = max(s_pag − a·(1000 − t), 0) (0 = constant)"),
        ),
        "Ahn et al. 2024, arXiv 2403.17377",
        "CFG plus a third pass with identity self-attention in chosen layers (diffusers' PAG layers); ε += s_pag(ε_c − ε_ptb)",
        diffusers="PerturbedAttentionGuidance",
    ),
    "slg": MethodSpec(
        "slg",
        SLG,
        (
            Param("skip_layer_guidance_scale", slg.SCALE, 0.0, 100.0, "s_slg: push away from the skipped-blocks prediction (0 = CFG)"),
            Param("skip_layer_guidance_start", slg.START, 0.0, 1.0, "skip pass on steps after int(start·N) (strictly)"),
            Param("skip_layer_guidance_stop", slg.STOP, 0.0, 1.0, "skip pass on steps before int(stop·N)"),
        ),
        "StabilityAI 2024 (SD3.5 reference code); after Karras et al. 2024, arXiv 2406.02507",
        "CFG plus a third pass with the guidance blocks skipped (SD3/PixArt: blocks 7-9, UNet: mid block); "
        "ε += s_slg(ε_c − ε_skip) in a step window",
        lambda p: check_window(p, "skip_layer_guidance_start", "skip_layer_guidance_stop"),
        "SkipLayerGuidance",
    ),
    "seg": MethodSpec(
        "seg",
        SEG,
        (
            Param("seg_guidance_scale", seg.SCALE, 0.0, 100.0, "s_seg: push away from the blurred-query prediction (0 = CFG)"),
            Param("seg_blur_sigma", seg.BLUR_SIGMA, 0.01, seg.BLUR_SIGMA,
                  f"σ of the query blur in tokens; above {seg.BLUR_THRESHOLD_INF:g} (the default) every query is the mean: "
                  "infinite blur"),
            Param("seg_guidance_start", 0.0, 0.0, 1.0, "blurred pass on steps after int(start·N) (strictly)"),
            Param("seg_guidance_stop", 1.0, 0.0, 1.0, "blurred pass on steps before int(stop·N)"),
        ),
        "Hong 2024, arXiv 2408.00760",
        "CFG plus a third pass with the guidance blocks' self-attention query blurred; ε += s_seg(ε_c − ε_seg)",
        lambda p: check_window(p, "seg_guidance_start", "seg_guidance_stop"),
        "SmoothedEnergyGuidance",
    ),
    "autoguidance": MethodSpec(
        "autoguidance",
        AutoGuidance,
        (),
        "Karras et al. 2024, arXiv 2406.02507",
        "guide away from a weaker model, the same one with its guidance blocks skipped, instead of the unconditional "
        "prediction: D_weak + s(D_c − D_weak); no negative prompt",
        diffusers="AutoGuidance",
    ),
    "tcfg": MethodSpec(
        "tcfg",
        TCFG,
        (),
        "Kwon et al. 2025, arXiv 2503.18137",
        "CFG against ε_u stripped of its component off the first singular direction of [ε_c; ε_u]",
        diffusers="TangentialClassifierFreeGuidance",
    ),
    "fdg": MethodSpec(
        "fdg",
        FDG,
        (
            Param("guidance_scale_low", fdg.GUIDANCE_SCALE_LOW, 0.0, 100.0,
                  "w_low: CFG scale of the low-frequency band (the guidance scale is w_high, the high band's)"),
            Param("parallel_weight", fdg.PARALLEL_WEIGHT, 0.0, 1.0,
                  "weight of each band's update part parallel to ε_c (1 = plain CFG update)"),
        ),
        "Sadat et al. 2025, arXiv 2506.19713",
        "CFG per band of a 2-level Laplacian pyramid: scale s on the high band, w_low on the low one",
        diffusers="FrequencyDecoupledGuidance",
    ),
    "mambo_g": MethodSpec(
        "mambo_g",
        MamboG,
        (Param("alpha", mambo.ALPHA, 0.0, 100.0, "α: damping of the scale by ‖ε_c − ε_u‖/‖ε_u‖ (0 = CFG)"),),
        "Wei et al. 2025, arXiv 2508.03442",
        "CFG at s' = 1 + (s − 1)·exp(−α‖ε_c − ε_u‖/‖ε_u‖) per image: the scale shrinks where the update is large",
        diffusers="MagnitudeAwareGuidance",
    ),
    "apg_mix": MethodSpec(
        "apg_mix",
        APGMix,
        (
            Param("adaptive_projected_guidance_scale", apg_mix.APG_SCALE, 0.0, 100.0, "s_apg: APG's scale after the CFG steps"),
            Param("adaptive_projected_guidance_momentum", apg_mix.MOMENTUM, -1.0, 1.0, "β: momentum of the update, CFG steps included"),
            Param("adaptive_projected_guidance_rescale", apg_mix.NORM_THRESHOLD, 0.0, 1000.0, "r: clip APG's update norm to r (0 = none)"),
            Param("eta", apg_mix.ETA, 0.0, 1.0, "η: weight of APG's update part parallel to ε_c"),
            Param("adaptive_projected_guidance_start_step", apg_mix.START_STEP, 0, 1000,
                  "CFG on steps ≤ this, APG after", integer=True),
        ),
        "Sadat et al. 2024, arXiv 2410.02416; as HunyuanImage-2.1 mixes it",
        "CFG (scale s) for the first steps, then APG (scale s_apg) with a momentum warmed up during the CFG steps",
        diffusers="AdaptiveProjectedMixGuidance",
    ),
}


def validate(key: str, params: Mapping[str, float], prediction_type: str | None = None) -> dict[str, float]:
    """Check a method key and its parameters; return the full parameter set with defaults filled in.

    prediction_type (one of PREDICTION_TYPES) picks defaults that depend on it (Param.default_for); None, when the
    model is not known yet (a request being built), takes each Param.default, which is safe for every model.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
    if key not in METHODS:
        raise ValueError(f"unknown guidance method {key!r}; choose one of: {', '.join(METHODS)}")
    spec = METHODS[key]
    allowed = {p.name: p for p in spec.params}
    for name in params:
        if name not in allowed:
            names = ", ".join(allowed) or "none"
            raise ValueError(f"guidance method {key!r} has no parameter {name!r}; its parameters: {names}")
    full = {}
    for p in spec.params:
        v = float(params.get(p.name, p.default_at(prediction_type)))
        if not (math.isfinite(v) and p.low <= v <= p.high):
            raise ValueError(f"{key}: {p.name} must be in [{_num(p.low)}, {_num(p.high)}], got {v:g}")
        if p.integer:
            if not v.is_integer():
                raise ValueError(f"{key}: {p.name} must be a whole number in [{_num(p.low)}, {_num(p.high)}], got {v:g}")
            v = int(v)
        full[p.name] = v
    if spec.check is not None:
        spec.check(full)
    return full


def create(
    key: str, guidance_scale: float, params: Mapping[str, float], prediction_type: str | None = None
) -> GuidanceMethod:
    """A fresh method instance for one run; prediction_type as in validate() (the loop knows it, from the model)."""
    full = validate(key, params, prediction_type)
    return METHODS[key].factory(guidance_scale=guidance_scale, **full)


def describe() -> str:
    """Every method with its paper, summary and parameters (default, allowed range), for `python -m pipelines guidance`."""
    lines = []
    for spec in METHODS.values():
        lines.append(f"{spec.key}: {spec.summary}")
        lines.append(f"  paper: {spec.paper}")
        for p in spec.params:
            kind = "integer" if p.integer else "number"
            per_type = "".join(f", {t}: {_num(v)}" for t, v in p.default_for.items())
            lines.append(f"  {p.name} = {_num(p.default)}{per_type}  ({kind} in [{_num(p.low)}, {_num(p.high)}]): {p.doc}")
        if not spec.params:
            lines.append("  (no parameters)")
    return "\n".join(lines)


def catalogue() -> list[dict]:
    """Every method as {"key", "diffusers", "params", "paper"}, for `python -m pipelines guidance --json`."""
    return [
        {
            "key": spec.key,
            "diffusers": spec.diffusers,
            "params": [{"name": p.name, "default": p.default, "low": p.low, "high": _finite(p.high), "integer": p.integer,
                        "doc": p.doc} | ({"default_for": dict(p.default_for)} if p.default_for else {})
                       for p in spec.params],
            "paper": spec.paper,
        }
        for spec in METHODS.values()
    ]


def _finite(v: float) -> float | None:
    """A bound for JSON: None for an unbounded (infinite) one, which JSON cannot write."""
    return v if math.isfinite(v) else None


def _num(v: float) -> str:
    """A number as people write it: 15 not 15.0, inf for math.inf."""
    return f"{v:g}"
