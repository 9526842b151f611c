"""The embedded model's colour previews show the colours of the image the run ends with.

Metric, `pipelines.previews.colour_error`: mean |RGB| difference on [0, 1] between a preview and the final image
(the PIL image generate() returns) after averaging both over 4×4 blocks, i.e. on the 16×16 latent grid. Images:
the 20 prompts below (every shape and colour, both sizes, varied positions), seeds 1-20, at the model's defaults
(DPM++ 2M, 20 steps, CFG 5). training/fit_preview.py fitted the preview decoder on other prompts with seeds from
100,000 up, under several schedulers and guidance scales, so these are held out.

Measured here (tiny preview decoder, "approx"; bounds 0.06 per image and 0.03 mean, about twice these):
last step's latents mean 0.012 / worst image 0.025; last step's x̂0 the same (DPM++ 2M's last step lands on its
x̂0); step 0's latents, a preview of noise, mean 0.30 / best image 0.18. On the drawn objects alone
(object_colour_error): 0.032 / 0.050, bounds 0.045 / 0.08. The full VAE decode ("decode") is 0.000
on the last step by construction and 0.30 on step 0. The old latent→RGB map (fitted on VAE-encoded renders, kept
on record in latent_preview.json and no longer offered) misses the final image by 0.34 on average (0.06-0.70) on
the same last-step latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.previews import (
    COLOUR_KINDS,
    LatentFormat,
    Previewer,
    colour_error,
    latent_rgb,
    load_preview_decoder,
    object_colour_error,
)
from pipelines.types import GenerationRequest
from shapes import world

MODEL = "tiny-shapes"
ASSET = Path(__file__).resolve().parent.parent / "assets" / "models" / "tiny-shapes"
PER_IMAGE_MAX = 0.06  # no image's last-step preview may miss the final image by more than this
MEAN_MAX = 0.03  # nor the 20 images on average
OBJECT_PER_IMAGE_MAX = 0.08  # the same on the cells of the drawn objects (object_colour_error): ~20/255 per channel
OBJECT_MEAN_MAX = 0.045
PROMPTS = [
    world.full_caption(shape, color, size, position, background)
    for shape, color, size, position, background in (
        ("heart", "yellow", "large", "center", "purple"),  # the example: once a blue blob on lavender
        ("circle", "red", "large", "top left", None),
        ("square", "green", "small", "top", None),
        ("triangle", "blue", "large", "top right", None),
        ("star", "orange", "small", "left", None),
        ("heart", "white", "large", "right", "black"),
        ("circle", "black", "small", "bottom left", None),
        ("square", "purple", "large", "bottom", None),
        ("triangle", "yellow", "small", "bottom right", None),
        ("star", "red", "large", "center", None),
        ("heart", "green", "small", "top left", None),
        ("circle", "blue", "small", "top right", "yellow"),
        ("square", "orange", "large", "left", None),
        ("triangle", "white", "large", "center", None),
        ("star", "purple", "large", "right", None),
        ("heart", "black", "large", "bottom left", "white"),
        ("circle", "yellow", "large", "bottom", None),
        ("square", "red", "small", "bottom right", None),
        ("triangle", "green", "large", "top", None),
        ("star", "blue", "small", "center", None),
    )
]


@pytest.fixture(scope="module")
def runs():
    """(previewer, [(final image, step-0 latents, last latents, last x̂0)]) for the 20 held-out images."""
    loader = ModelLoader(device="cpu")
    pipe = loader.get(MODEL)
    out = []
    for seed, prompt in enumerate(PROMPTS, start=1):
        observer = CollectingObserver()
        result = generate(GenerationRequest(prompt, model=MODEL, num_inference_steps=20, guidance_scale=5.0,
                                            seed=seed), observer, loader=loader)
        assert result.scheduler == "dpmpp_2m" and result.num_steps == 20
        first, last = observer.events[0], observer.events[-1]
        out.append((np.asarray(result.image), first.latents, last.latents, last.denoised))
    return Previewer(pipe), out


def test_embedded_model_offers_only_faithful_colour_kinds(runs):
    previewer, _ = runs
    assert previewer.kinds == ("channels", "approx", "decode")  # the linear map is not offered (see below)
    assert {k for k in previewer.kinds if k in COLOUR_KINDS} == {"approx", "decode"}
    assert previewer.fast_kind == "approx"
    assert previewer.label("approx") == "tiny preview decoder (fitted to this VAE)"
    assert previewer._decoder is None or previewer.format.decoder_file  # loaded from the model folder, lazily


@pytest.mark.parametrize("kind", ["approx", "decode"])  # every colour kind offered (the test above pins the list)
def test_last_step_previews_match_the_final_image_and_step_0_does_not(runs, kind):
    previewer, images = runs
    errors = {"latents": [], "x0": [], "step 0": []}
    for final, step0, latents, denoised in images:
        errors["latents"].append(colour_error(previewer.render(kind, latents), final, previewer.scale))
        errors["x0"].append(colour_error(previewer.render(kind, denoised), final, previewer.scale))
        errors["step 0"].append(colour_error(previewer.render(kind, step0), final, previewer.scale))
    for source in ("latents", "x0"):
        e = np.array(errors[source])
        assert e.max() <= PER_IMAGE_MAX and e.mean() <= MEAN_MAX, (kind, source, e.round(3))
    assert min(errors["step 0"]) > PER_IMAGE_MAX, (kind, np.round(errors["step 0"], 3))


@pytest.mark.parametrize("kind", ["approx", "decode"])
def test_last_step_previews_show_the_objects_in_their_colours(runs, kind):
    """The whole-image mean hides a small object (~5% of the pixels): a preview decoder fitted without weighting
    the objects passed the bound above while it showed a green triangle blue and a red star green. On the cells
    of the drawn objects (the final image's cells away from its background colour), measured: tiny preview decoder
    mean 0.032 / worst image 0.050 (the decoder before it: 0.051 / 0.115, see the next test), step 0 at least 0.15;
    the full VAE decode 0.000 on the last step."""
    previewer, images = runs
    errors = {"latents": [], "x0": [], "step 0": []}
    for final, step0, latents, denoised in images:
        for source, z in (("latents", latents), ("x0", denoised), ("step 0", step0)):
            errors[source].append(object_colour_error(previewer.render(kind, z), final, previewer.scale))
    assert None not in errors["latents"]  # every final image shows an object
    for source in ("latents", "x0"):
        e = np.array(errors[source])
        assert e.max() <= OBJECT_PER_IMAGE_MAX and e.mean() <= OBJECT_MEAN_MAX, (kind, source, e.round(3))
    assert min(errors["step 0"]) > OBJECT_PER_IMAGE_MAX, (kind, np.round(errors["step 0"], 3))


def test_the_unweighted_preview_decoder_fails_the_object_bound(runs):
    """The decoder shipped before this one (fitted with no weight on the objects; kept as a test fixture) misses
    the objects' colours although it passes the whole-image bound."""
    previewer, images = runs
    old = Previewer(previewer.pipe)
    old._decoder = load_preview_decoder(Path(__file__).parent / "fixtures" / "preview_decoder_unweighted.safetensors")
    errors = np.array([object_colour_error(old.render("approx", latents), final, 4) for final, _, latents, _ in images])
    assert errors.max() > OBJECT_PER_IMAGE_MAX and errors.mean() > OBJECT_MEAN_MAX, errors.round(3)


def test_object_colour_error_looks_at_the_object_only():
    background = np.full((16, 16, 3), 200, np.uint8)
    drawn = background.copy()
    drawn[4:8, 4:8] = [255, 0, 0]  # one latent cell of 16 is an object
    wrong = drawn.copy()
    wrong[4:8, 4:8] = [0, 255, 0]  # the same object in another colour
    assert colour_error(wrong, drawn, 4) == pytest.approx(2 / 3 / 16)  # diluted by the 15 background cells
    assert object_colour_error(wrong, drawn, 4) == pytest.approx(2 / 3)  # on the object: the whole difference
    assert object_colour_error(drawn, drawn, 4) == 0.0 and object_colour_error(drawn, background, 4) is None


def test_the_old_linear_map_fails_the_same_bound(runs):
    """The map fitted on VAE-encoded renders, on record in latent_preview.json, is not offered: it misses every image
    by more than the bound. (Refitted for v2's decoder, which was trained to decode averaged latents and so is closer
    to linear, it misses by 0.12 on average, 0.09 at best; v1's map missed by 0.34.)"""
    previewer, images = runs
    data = json.loads((ASSET / "latent_preview.json").read_text())
    assert data["offer_rgb"] is False
    old = LatentFormat("old", 4, tuple(map(tuple, data["latent_rgb_factors"])), tuple(data["latent_rgb_bias"]), "old")
    errors = [colour_error(latent_rgb(latents, old).repeat(4, 0).repeat(4, 1), final, 4)
              for final, _, latents, _ in images]
    assert min(errors) > PER_IMAGE_MAX and np.mean(errors) > 3 * MEAN_MAX, np.round(errors, 3)


def test_colour_error_is_measured_on_the_latent_grid():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0] = 255  # one pixel of a 4×4 cell: 1/16 of that cell, 1/4 of the cells
    assert colour_error(a, b, 4) == pytest.approx(1 / 16 / 4)
    b[:4, :4] = [255, 0, 0]
    assert colour_error(a, b, 4) == pytest.approx(1 / 3 / 4)
    with pytest.raises(ValueError, match="two \\(H, W, 3\\) images of one shape"):
        colour_error(a, b[:4], 4)


def test_fit_is_deterministic_and_learns(tiny_loader):
    """training.fit_preview.fit: same seed, same weights; and it beats its own start on the data it saw."""
    from pipelines.previews import PreviewDecoderConfig
    from training.fit_preview import decode_targets, fit

    pipe = tiny_loader.get("sd")
    torch.manual_seed(0)
    latents = torch.randn(16, 4, 8, 8)
    targets = decode_targets(pipe, latents)
    config = PreviewDecoderConfig(latent_channels=4, hidden=8, layers=2, scale=pipe.vae_scale_factor)
    a = fit(latents, targets, config, epochs=3, seed=0, batch=8)
    b = fit(latents, targets, config, epochs=3, seed=0, batch=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    untrained = fit(latents, targets, config, epochs=0, seed=0)
    with torch.no_grad():
        assert (a(latents) - targets).abs().mean() < (untrained(latents) - targets).abs().mean()


def test_the_apps_live_panels_show_the_final_images_colours(tmp_path):
    """What the page shows, not just the Previewer: the PNGs the live view and scrubber serve for the last step
    (x_t, live x̂0, scrubber x̂0), from the worker's run, against the image the run ends with. The x_t panel
    once used a Previewer built from a scheduler view, which fell back to the linear map (green for a red image)."""
    from PIL import Image

    from ui.state import Playground

    loader = ModelLoader(device="cpu")
    playground = Playground(loader, [MODEL], MODEL, tmp_path, preview_interval=0.0)
    try:
        for seed, prompt in enumerate(PROMPTS[:4], start=1):
            for scheduler in (None, "euler_a"):  # the model's own scheduler and a per-scheduler view of it
                run = playground.start(GenerationRequest(prompt, model=MODEL, scheduler=scheduler, num_inference_steps=20,
                                                         guidance_scale=5.0, seed=seed), "auto", session=None)
                assert run.done.wait(120) and run.error is None, run.error
                assert (run.latents_kind, run.live_x0_kind) == ("approx", "approx")
                final = np.asarray(run.result.image.convert("RGB"))
                last = len(run.steps) - 1
                for step, bound in ((last, PER_IMAGE_MAX), (0, None)):
                    for name in ("latents", "x0_live", "x0"):
                        shown = Image.open(playground.render(run, step, name)).convert("RGB")
                        error = colour_error(np.asarray(shown.resize(run.result.image.size, Image.BOX)), final, 4)
                        if bound is not None:
                            assert error <= bound, (prompt, scheduler, name, round(error, 3))
                        elif name == "latents":
                            assert error > PER_IMAGE_MAX, (prompt, scheduler, name, round(error, 3))  # noise at step 0
    finally:
        playground.worker.close()
