"""Explicit registry of guidance methods: key -> constructor, parameters with defaults and ranges, paper."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from guidance import apg, cfg_zero_star, interval
from guidance.apg import APG
from guidance.base import GuidanceMethod
from guidance.cfg import CFG
from guidance.cfg_zero_star import CFGZeroStar
from guidance.interval import Interval, check_interval
from guidance.pag import PAG
from guidance.rescale import Rescale


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a method."""

    name: str  # keyword passed to the method's constructor (diffusers' name where it has one)
    default: float  # value used when the request does not set it
    low: float  # smallest allowed value (inclusive)
    high: float  # largest allowed value (inclusive); math.inf for unbounded
    doc: str  # one line for --help, the UI and `python -m pipelines guidance`
    integer: bool = False  # only whole numbers allowed (a step count, or 0/1 for a switch); passed on as int


@dataclass(frozen=True)
class MethodSpec:
    """A registered guidance method."""

    key: str  # registry key used by requests, the CLI and the UI
    factory: Callable[..., GuidanceMethod]  # called as factory(guidance_scale=s, **params), once per run
    params: tuple[Param, ...]  # tunable parameters
    paper: str  # citation
    summary: str  # one line: what it does
    check: Callable[[dict[str, float]], None] | None = None  # cross-parameter rule on the full set; raises ValueError


METHODS: dict[str, MethodSpec] = {
    "cfg": MethodSpec(
        "cfg", CFG, (), "Ho & Salimans 2022, arXiv 2207.12598", "ε_u + s(ε_c − ε_u); scale ≤ 1 skips the unconditional pass"
    ),
    "rescale": MethodSpec(
        "rescale",
        Rescale,
        (Param("guidance_rescale", 0.7, 0.0, 1.0, "φ: mix of the std-rescaled CFG output (0 = plain CFG)"),),
        "Lin et al. 2023, arXiv 2305.08891",
        "CFG rescaled to the std of ε_c, mixed by φ; fights over-exposure at high scales",
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
                "number of first steps whose prediction is zeroed (0 = none)",
                integer=True,
            ),
        ),
        "Fan et al. 2025, arXiv 2503.18886",
        "uncond prediction scaled by s* = <v_c, v_u>/|v_u|², then CFG; first steps zeroed (meant for flow models)",
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
    ),
}


def validate(key: str, params: Mapping[str, float]) -> dict[str, float]:
    """Check a method key and its parameters; return the full parameter set with defaults filled in."""
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
        v = float(params.get(p.name, p.default))
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


def create(key: str, guidance_scale: float, params: Mapping[str, float]) -> GuidanceMethod:
    """A fresh method instance for one run."""
    full = validate(key, params)
    return METHODS[key].factory(guidance_scale=guidance_scale, **full)


def describe() -> str:
    """Every method with its paper, summary and parameters (default, allowed range), for `python -m pipelines guidance`."""
    lines = []
    for spec in METHODS.values():
        lines.append(f"{spec.key}: {spec.summary}")
        lines.append(f"  paper: {spec.paper}")
        for p in spec.params:
            kind = "integer" if p.integer else "number"
            lines.append(f"  {p.name} = {_num(p.default)}  ({kind} in [{_num(p.low)}, {_num(p.high)}]): {p.doc}")
        if not spec.params:
            lines.append("  (no parameters)")
    return "\n".join(lines)


def _num(v: float) -> str:
    """A number as people write it: 15 not 15.0, inf for math.inf."""
    return f"{v:g}"
