"""Explicit registry of guidance methods: key -> constructor, parameters with defaults and ranges, paper."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from guidance.base import GuidanceMethod
from guidance.cfg import CFG
from guidance.rescale import Rescale


@dataclass(frozen=True)
class Param:
    """One tunable parameter of a method."""

    name: str  # keyword passed to the method's constructor (diffusers' name where it has one)
    default: float  # value used when the request does not set it
    low: float  # smallest allowed value (inclusive)
    high: float  # largest allowed value (inclusive); math.inf for unbounded
    doc: str  # one line for --help, the UI and `python -m pipelines guidance`


@dataclass(frozen=True)
class MethodSpec:
    """A registered guidance method."""

    key: str  # registry key used by requests, the CLI and the UI
    factory: Callable[..., GuidanceMethod]  # called as factory(guidance_scale=s, **params), once per run
    params: tuple[Param, ...]  # tunable parameters
    paper: str  # citation
    summary: str  # one line: what it does


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
            raise ValueError(f"{key}: {p.name} must be in [{p.low}, {p.high}], got {v}")
        full[p.name] = v
    return full


def create(key: str, guidance_scale: float, params: Mapping[str, float]) -> GuidanceMethod:
    """A fresh method instance for one run."""
    full = validate(key, params)
    return METHODS[key].factory(guidance_scale=guidance_scale, **full)
