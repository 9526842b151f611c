"""Preview strategies and every guidance method on every model family, through generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from guidance.registry import METHODS
from pipelines.generate import generate
from pipelines.observers import CollectingObserver
from pipelines.previews import (
    KIND_LABELS,
    PREVIEW_KINDS,
    SD1,
    SD3,
    LatentFormat,
    PreviewDecoder,
    PreviewDecoderConfig,
    Previewer,
    channel_grid,
    latent_format_for,
    latent_rgb,
    load_preview_decoder,
    save_preview_decoder,
)
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
        assert SD3.channels == 16 and fmt.rgb_factors is None and fmt.taesd_repo is None
        assert Previewer(pipe).kinds == ("channels", "decode")


def tiny_taesd(latent_channels: int = 4, **config) -> AutoencoderTiny:
    """A random AutoencoderTiny with factor 2 (two decoder stages), as the tiny pipelines' VAEs."""
    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=latent_channels,
                           **config).eval()


def test_every_kind_has_a_label_and_unknown_kinds_list_the_offered_ones(loader):
    previewer = Previewer(loader.get("sd"))
    assert set(KIND_LABELS) == set(PREVIEW_KINDS)
    assert previewer.kinds == ("channels", "rgb", "decode")  # no TAESD in this offline cache, no fitted decoder
    assert previewer.label("rgb") == "latent→RGB linear map" and previewer.fast_kind == "rgb"
    latents = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown preview kind 'vae'.*channels, rgb, decode"):
        previewer.render("vae", latents)
    with pytest.raises(ValueError, match="'taesd' is not offered.*channels, rgb, decode"):
        previewer.render("taesd", latents)


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_taesd_and_preview_decoder_render_at_image_size(loader, family):
    pipe, _ = loader.view(family, None)
    decoder = PreviewDecoder(PreviewDecoderConfig(latent_channels=4, hidden=8, layers=2, scale=pipe.vae_scale_factor))
    previewer = Previewer(pipe, taesd=tiny_taesd(), decoder=decoder)
    assert {"taesd", "approx"} <= set(previewer.kinds) and previewer.fast_kind == "approx"
    observer = CollectingObserver()
    generate(GenerationRequest("a red circle", model=family, num_inference_steps=2, seed=0, width=32, height=24),
             observer, loader=loader)
    for kind in ("taesd", "approx"):
        image = previewer.render(kind, observer.events[-1].latents)
        assert image.dtype == np.uint8 and image.shape == (24, 32, 3), kind


def test_taesd_gets_model_space_latents_unscaled_by_its_own_config(loader):
    """TAESD decodes model-space latents (its configs: scaling_factor 1, shift 0); a pipeline divides by those."""
    pipe = loader.get("sd")
    latents = torch.randn(2, 4, 8, 8)
    for config, z in (({}, latents[:1]), ({"scaling_factor": 2.0, "shift_factor": 0.25}, latents[:1] / 2.0 + 0.25)):
        taesd = tiny_taesd(**config)
        expected = ((taesd.decode(z).sample[0].clamp(-1, 1).permute(1, 2, 0).detach().numpy() + 1) / 2 * 255 + 0.5)
        got = Previewer(pipe, taesd=taesd).render("taesd", latents)
        np.testing.assert_array_equal(got, expected.astype(np.uint8))


def test_taesd_is_offered_only_from_the_local_cache_and_loaded_lazily(loader, tmp_path, monkeypatch):
    """A TAESD repo laid out as the HF cache lays it out is found offline; nothing is downloaded."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    pipe = loader.get("sd")
    assert "taesd" not in Previewer(pipe).kinds  # empty cache
    snapshot = tmp_path / "models--madebyollin--taesd" / "snapshots" / "0123abcd"
    tiny_taesd().save_pretrained(snapshot)
    (tmp_path / "models--madebyollin--taesd" / "refs").mkdir()
    (tmp_path / "models--madebyollin--taesd" / "refs" / "main").write_text("0123abcd")
    previewer = Previewer(pipe)
    assert previewer.kinds == ("channels", "rgb", "taesd", "decode") and previewer._taesd is None
    assert previewer.render("taesd", torch.randn(1, 4, 8, 8)).shape == (16, 16, 3)
    assert previewer._taesd is not None  # loaded on first use
    # A cached TAESD for another channel count is not offered (the tiny SD3 VAE has 4 channels, taesd3 16).
    (snapshot / "config.json").write_text((snapshot / "config.json").read_text().replace(
        '"latent_channels": 4', '"latent_channels": 16'))
    assert "taesd" not in Previewer(pipe).kinds


def test_injected_previewers_must_match_the_latent_channels(loader):
    pipe = loader.get("sd")
    with pytest.raises(ValueError, match="taesd takes 16-channel latents but this model's VAE makes 4"):
        Previewer(pipe, taesd=tiny_taesd(16))
    with pytest.raises(ValueError, match="decoder takes 3-channel"):
        Previewer(pipe, decoder=PreviewDecoder(PreviewDecoderConfig(latent_channels=3)))


def test_preview_decoder_file_round_trips_with_its_config(tmp_path):
    torch.manual_seed(0)
    decoder = PreviewDecoder(PreviewDecoderConfig(latent_channels=4, hidden=8, layers=3, scale=2)).eval()
    path = save_preview_decoder(decoder, tmp_path / "d.safetensors")
    loaded = load_preview_decoder(path)
    assert loaded.config == decoder.config
    z = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        out = loaded(z)
        assert out.shape == (1, 3, 10, 12)
        torch.testing.assert_close(out, decoder.half().float()(z), rtol=0, atol=1e-6)  # weights stored as fp16


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
