"""Explain lab 2 (issue 24), items 1 and 4 on the embedded model (tiny-shapes, 64×64) with fixed seeds: where the run
can still go (x̂0 against the mean of the branches' endings) and coarse before fine (how much x̂0 changes per step in
low, middle and high spatial frequencies)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipelines import explain
from pipelines.explain.metrics import BANDS, band_change
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.requests import build_request, missing_embedded
from pipelines.types import DEFAULT_MODEL

needs_model = pytest.mark.skipif(missing_embedded(DEFAULT_MODEL) is not None, reason="embedded model not installed")


@pytest.fixture(scope="module")
def loader() -> ModelLoader:
    return ModelLoader(device="cpu")


@pytest.fixture(scope="module")
def jumps(loader):
    """Jump vs walk at the model's recommended 20 steps (its own scheduler, CFG 3), no k-step runs."""
    reqs = [build_request(prompt=p, model=DEFAULT_MODEL, loader=loader, seed=s)
            for p, s in [("a large red circle in the center", 1), ("a small blue star in the top left", 3)]]
    return [explain.finish(explain.jump(r, loader=loader, short_steps=[])) for r in reqs]


def _stripes(period: int) -> np.ndarray:
    """A 64² grey image with vertical sine stripes of `period` pixels, (H, W, 3) uint8."""
    x = np.arange(64)
    row = 0.5 + 0.4 * np.sin(2 * np.pi * x / period)
    return np.repeat((row * 255).round().astype(np.uint8)[None, :, None], 64, 0).repeat(3, 2)


def test_band_change_puts_each_frequency_in_its_band_and_adds_up_to_the_rms():
    """Stripes of 32 px are layout (low), of 8 px middle, of 2.5 px detail (high); the bands' squares add up to the
    RMS difference (Parseval), so a band's share is its square over the sum."""
    grey = np.full((64, 64, 3), 128, np.uint8)
    for period, band in [(32, 0), (8, 1), (2.5, 2)]:
        change = band_change(grey, _stripes(period))
        assert int(np.argmax(change)) == band and change[band] ** 2 > 0.99 * sum(c * c for c in change), (period, change)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    assert np.sqrt(sum(c * c for c in band_change(a, b))) == pytest.approx(explain.rms(a, b), rel=1e-4)
    assert band_change(a, a) == (0.0, 0.0, 0.0)


@needs_model
def test_coarse_before_fine_the_low_band_leads_early_and_gives_way_late(jumps):
    """The first steps change x̂0 mostly in the low band (the layout), the last ones much less so (the details):
    the low band's mean share of the change over steps 2-5 is larger than over the last four steps (red circle,
    seed 1: 0.82 against 0.59; blue star, seed 3: 0.85 against 0.06). Step 1 has no earlier x̂0 (no bands)."""
    for report in jumps:
        shares = [s.band_shares() for s in report.steps]
        assert shares[0] is None and all(s is not None for s in shares[1:])
        low = [s[0] for s in shares[1:]]
        assert np.mean(low[:4]) > np.mean(low[-4:]), low
        for s in shares[1:]:
            assert sum(s) == pytest.approx(1.0)


@needs_model
def test_bands_are_the_change_between_consecutive_x0_images_and_go_to_jump_json(jumps, tmp_path):
    report = jumps[0]
    steps = report.steps
    for prev, cur in zip(steps, steps[1:]):  # every image is kept (no image budget)
        assert np.sqrt(sum(c * c for c in cur.bands)) == pytest.approx(explain.rms(prev.image, cur.image), rel=1e-4)
    report.write(tmp_path)
    data = json.loads((tmp_path / "jump.json").read_text())
    assert set(data["bands"]) == set(BANDS) == {"low", "mid", "high"}
    assert all(len(v) == len(steps) and v[0] is None for v in data["bands"].values())
    assert data["bands"]["low"][1] == pytest.approx(steps[1].bands[0], abs=1e-6)
    assert (tmp_path / "jump.png").is_file()


@needs_model
def test_x0_approaches_the_mean_of_the_endings_as_the_branch_point_moves_on(loader, tmp_path):
    """Where can it still go? x̂0 at the branch step estimates the pixel mean of the endings (a blend of them): its
    RMS distance to the mean of 4 endings falls from the first branch point (f = 0, the very first step) to the
    middle one (red circle, seed 1, euler_a, CFG 1, 10 steps: 0.107 at f=0, 0.023 at f=0.5, 0 at f=0.9)."""
    req = build_request(prompt="a large red circle in the center", model=DEFAULT_MODEL, loader=loader, seed=1,
                        scheduler="euler_a", guidance_scale=1.0, num_inference_steps=10)
    report = explain.finish(explain.branch(req, [0.0, 0.5, 0.9], 4, loader=loader))
    first, middle, _ = report.points
    rerun = generate(dataclasses.replace(req, branch=(middle.step, middle.seeds[1])), loader=loader)  # the trunk too
    assert np.array_equal(np.asarray(rerun.image), np.asarray(middle.images[1]))  # the branch from its snapshot
    assert first.step == 0 and first.x0_to_mean > middle.x0_to_mean, [p.x0_to_mean for p in report.points]
    for p in report.points:
        mean = np.mean([explain.pixels(i) for i in p.images], axis=0)
        assert np.abs(p.mean.astype(np.float32) / 255 - mean).max() <= 0.5 / 255 + 1e-6  # the rounded mean
        assert p.x0_to_mean == pytest.approx(float(np.sqrt(np.mean((explain.pixels(p.x0) - mean) ** 2))), abs=1e-6)
    data = report.write(tmp_path)
    saved = json.loads((tmp_path / "branch.json").read_text())
    assert saved["x0_to_mean"] == pytest.approx([p.x0_to_mean for p in report.points], abs=1e-5)
    assert len(saved["means"]) == len(saved["x0"]) == 3 == len(data["means"])
    assert all((tmp_path / path).is_file() for path in saved["means"] + saved["x0"])


@needs_model
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_a_branch_from_a_snapshot_equals_the_branch_that_re_runs_the_trunk(loader, scheduler):
    """generate(start=snapshot) continues a run at step k from its x_t and a copy of the scheduler's state (a
    multistep DPM++ 2M keeps model_outputs): the branch equals the one that re-runs steps 0..k-1, pixel for pixel."""
    req = build_request(prompt="a large red circle in the center", model=DEFAULT_MODEL, loader=loader, seed=1,
                        scheduler=scheduler, guidance_scale=1.0, num_inference_steps=8)
    kept = []
    generate(req, loader=loader, snapshot=({3}, kept.append))
    assert [s.step for s in kept] == [3]
    for branch_seed in (11, 12):  # one snapshot starts several branches (the scheduler state is copied each time)
        branched = dataclasses.replace(req, branch=(3, branch_seed))
        whole = generate(branched, loader=loader)
        resumed = generate(branched, loader=loader, start=kept[0])
        assert np.array_equal(np.asarray(whole.image), np.asarray(resumed.image))
        assert torch.equal(whole.latents, resumed.latents)
    with pytest.raises(ValueError, match="a snapshot starts at a step from 0 to 2 .* got step 3"):
        generate(dataclasses.replace(req, num_inference_steps=3), loader=loader, start=kept[0])
