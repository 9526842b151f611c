"""CFG-Zero*'s zero-init belongs to flow models: its defaults per prediction type, and what it does to an ε model."""

from __future__ import annotations

import numpy as np
import pytest

from guidance import registry
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import Observer
from pipelines.types import GenerationRequest

# The background named: left open, CFG-Zero*'s rescaled first steps may pick another one than CFG (a 0.23 |Δ|)
BASE = dict(prompt="a large red circle in the center on a blue background", seed=1, num_inference_steps=20, guidance_scale=5.0)


@pytest.fixture(scope="module")
def loader() -> ModelLoader:
    return ModelLoader(device="cpu")


def pixels(loader: ModelLoader, **kw) -> np.ndarray:
    """The embedded model's image for BASE + kw, as float (H, W, 3) in [0, 1]."""
    image = generate(GenerationRequest(**(BASE | kw)), loader=loader).image
    return np.asarray(image, dtype=np.float64) / 255.0


def high_frequency(a: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels: ~0.025 for a clean shape on a plain background."""
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_defaults_on_the_embedded_model_look_like_cfg(loader) -> None:
    """On v1 (epsilon) zero-init of one step gave noise (0.29 mean |Δ| to CFG, 6.6x the edges). The embedded model is
    now v-prediction on a zero-SNR schedule, where a zeroed first prediction is x̂0 = 0 and hardly matters (0.007)."""
    cfg = pixels(loader)
    star = pixels(loader, guidance="cfg_zero_star")
    old = pixels(loader, guidance="cfg_zero_star", guidance_params={"zero_init_steps": 1})
    assert np.abs(star - cfg).mean() < 0.03
    assert high_frequency(star) < 1.5 * high_frequency(cfg)
    assert np.abs(old - cfg).mean() < 0.03 and high_frequency(old) < 1.5 * high_frequency(cfg)


@pytest.mark.parametrize(("prediction_type", "zero_init_steps"),
                         [(None, 0), ("epsilon", 0), ("v_prediction", 0), ("sample", 0), ("flow", 1)])
def test_zero_init_default_depends_on_prediction_type(prediction_type: str | None, zero_init_steps: int) -> None:
    assert registry.validate("cfg_zero_star", {}, prediction_type) == {"zero_init_steps": zero_init_steps}
    assert registry.create("cfg_zero_star", 5.0, {}, prediction_type=prediction_type).zero_init_steps == zero_init_steps
    # An explicit value wins on any model, as in diffusers' guider.
    assert registry.create("cfg_zero_star", 5.0, {"zero_init_steps": 2}, prediction_type=prediction_type).zero_init_steps == 2


def test_unknown_prediction_type_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction, sample, flow"):
        registry.create("cfg", 5.0, {}, prediction_type="eps")


def test_per_type_defaults_are_in_range_and_documented() -> None:
    for spec in registry.METHODS.values():
        for p in spec.params:
            for prediction_type, value in p.default_for.items():
                assert prediction_type in registry.PREDICTION_TYPES
                assert p.low <= value <= p.high and (not p.integer or float(value).is_integer())
    assert "zero_init_steps = 0, flow: 1" in registry.describe()


class Scales(Observer):
    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_step(self, event) -> None:
        self.scales.append(event.effective_scale)


@pytest.mark.parametrize(("family", "zeroed"), [("sd3", True), ("sd", False), ("sd_v", False)])
def test_the_loop_zeroes_the_first_step_on_flow_models_only(tiny_loader, family: str, zeroed: bool) -> None:
    observer = Scales()
    generate(GenerationRequest(prompt="a red circle", model=family, guidance="cfg_zero_star", num_inference_steps=3,
                               guidance_scale=5.0, seed=0, width=32, height=32), observer, loader=tiny_loader)
    assert (observer.scales[0] == 0.0) is zeroed  # effective_scale 0.0 marks a zeroed step
    assert all(s != 0.0 for s in observer.scales[1:])
