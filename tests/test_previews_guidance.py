"""Preview strategies and every guidance method on every model family, through generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance.registry import METHODS
from pipelines.generate import generate
from pipelines.observers import CollectingObserver
from pipelines.previews import SD1, SD3, LatentFormat, Previewer, channel_grid, latent_rgb, latent_format_for
from pipelines.types import GenerationRequest

FAMILIES = ["sd", "sdxl", "pixart_sigma", "sd3"]


@pytest.fixture(scope="module")
def loader(tiny_loader):
    return tiny_loader


def test_channel_grid_tiles_normalized_channels():
    latents = torch.stack([torch.full((4, 5), float(i)) for i in range(4)])[None]
    latents[0, 1, 0, 0] = 10.0  # one channel with contrast
    grid = channel_grid(latents)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 4 + 1, 2 * 5 + 1)
    assert grid[0, 5 + 1] == 255 and grid[1, 5 + 1] == 0  # channel 1 top-left is its max, the rest its min
    sixteen = channel_grid(torch.randn(2, 16, 8, 8))
    assert sixteen.shape == (4 * 8 + 3, 4 * 8 + 3)


def test_latent_rgb_is_the_linear_map():
    fmt = LatentFormat("t", 2, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), (0.0, 0.0, -1.0), "test")
    latents = torch.zeros(1, 2, 3, 3)
    latents[0, 0] = 1.0  # red = 1 -> 255; green = 0 -> 128; blue = -1 -> 0
    rgb = latent_rgb(latents, fmt)
    assert rgb.shape == (3, 3, 3) and tuple(rgb[0, 0]) == (255, 128, 0)
    with pytest.raises(ValueError, match="no latent→RGB map"):
        latent_rgb(latents, LatentFormat("x", 2, None, (0, 0, 0), "none"))


@pytest.mark.parametrize("family,expected", [("sd", SD1), ("sd3", None)])
def test_format_by_family_and_channel_check(loader, family, expected):
    pipe = loader.get(family)
    fmt = latent_format_for(pipe)
    if expected is not None:
        assert fmt == expected
    else:  # the tiny SD3 VAE has 4 channels, the published SD3 map 16: no RGB map, only grid and decode
        assert SD3.channels == 16 and fmt.rgb_factors is None
        assert Previewer(pipe).kinds == ("channels", "decode")


@pytest.mark.parametrize("family", FAMILIES)
def test_previewer_renders_every_kind_at_image_size(loader, family):
    pipe, _ = loader.view(family, None)
    previewer = Previewer(pipe)
    observer = CollectingObserver()
    generate(GenerationRequest("a red circle", model=family, num_inference_steps=2, seed=0, width=32, height=24),
             observer, loader=loader)
    latents = observer.events[-1].latents
    for kind in previewer.kinds:
        image = previewer.render(kind, latents)
        assert image.dtype == np.uint8
        if kind != "channels":
            assert image.shape == (24, 32, 3)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_guidance_method_runs_on_every_family(loader, family, method):
    observer = CollectingObserver()
    result = generate(GenerationRequest("a red circle", model=family, num_inference_steps=3, guidance_scale=4.0,
                                        seed=0, width=32, height=32, guidance=method), observer, loader=loader)
    assert torch.isfinite(result.latents).all()
    assert len(observer.events) == result.num_steps
    for e in observer.events:
        assert e.effective_scale >= 0.0
        if e.denoised_cond is not None:  # the unconditional pass ran: its diagnostics are there
            assert e.guidance_delta_norm is not None and e.guidance_delta_norm >= 0


def test_non_cfg_methods_change_the_image_and_cfg_does_not(loader):
    base = dict(prompt="a red circle", model="sd", num_inference_steps=3, guidance_scale=6.0, seed=0, width=32,
                height=32, scheduler="euler")
    plain = generate(GenerationRequest(**base), loader=loader).latents
    same = generate(GenerationRequest(**base, guidance="rescale", guidance_params={"guidance_rescale": 0.0}),
                    loader=loader).latents
    torch.testing.assert_close(plain, same, rtol=0, atol=0)
    for method in ("rescale", "apg", "cfg_zero_star"):
        other = generate(GenerationRequest(**base, guidance=method), loader=loader).latents
        assert not torch.allclose(plain, other), method
