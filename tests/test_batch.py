"""Batches (num_images_per_prompt): one batched model call per step, image i from seed + i, equal to the stock pipeline
given a list of generators and to the single run with seed + i; the budget counts the batch; every image is written
with the request that makes it alone (Python API, CLI, HTTP API)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import Trace, TraceWriter
from pipelines.requests import build_request
from pipelines.types import MAX_IMAGES_PER_PROMPT, GenerationRequest
from tests.tiny import TINY_SIZE, tiny_pipeline

FAMILIES = ["sd", "sdxl", "pixart_sigma", "sd3"]
STOCHASTIC = {"sd": "euler_a", "sdxl": "euler_a", "pixart_sigma": "ddpm", "sd3": "flow_euler"}  # fresh noise per step


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same_image(a: Image.Image, b: Image.Image) -> None:
    """Equal up to float rounding: a batched convolution sums in another order than a single one, which moves a
    handful of 8-bit values by one level (measured on the embedded model: at most 1 level, on < 0.03 % of values)."""
    diff = np.abs(pixels(a) - pixels(b))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_stock_with_a_list_of_generators_and_each_single_run(tiny_loader, family):
    size = TINY_SIZE[family]
    scheduler = STOCHASTIC[family]
    batch = GenerationRequest(prompt="a red circle", negative_prompt="blue", model=family, scheduler=scheduler,
                              num_inference_steps=4, guidance_scale=5.0, seed=7, width=size, height=size,
                              num_images_per_prompt=3)
    ours = generate(batch, loader=tiny_loader)
    assert ours.seeds == (7, 8, 9) and len(ours.images) == 3 and ours.latents.shape[0] == 3
    assert len({pixels(im).tobytes() for im in ours.images}) == 3  # three different images

    # The stock pipeline, given one generator per image (diffusers' way to seed a batch), makes the same batch.
    stock = tiny_pipeline(family)
    stock.scheduler = tiny_loader.view(family, scheduler)[0].scheduler.__class__.from_config(
        tiny_loader.view(family, scheduler)[0].scheduler.config)
    extra = {"use_resolution_binning": False} if family == "pixart_sigma" else {}
    images = stock(prompt="a red circle", negative_prompt="blue", num_inference_steps=4, guidance_scale=5.0,
                   width=size, height=size, num_images_per_prompt=3, output_type="pil",
                   generator=[torch.Generator("cpu").manual_seed(7 + i) for i in range(3)], **extra).images
    for mine, theirs in zip(ours.images, images):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1

    # Image i is the single run with seed + i (so it can be reproduced and shared alone).
    for i in range(3):
        alone = generate(batch.image_alone(ours.seed, i), loader=tiny_loader)
        assert alone.seed == 7 + i
        assert_same_image(ours.images[i], alone.image)


def test_a_batch_is_one_batched_model_call_per_step(tiny_pipes_eager):
    loader, unet = tiny_pipes_eager
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[0]),
                                          with_kwargs=True)
    try:
        generate(GenerationRequest(prompt="x", model="sd", scheduler="euler", num_inference_steps=3, guidance_scale=5.0, seed=1,
                                   width=32, height=32, num_images_per_prompt=4), loader=loader)
    finally:
        hook.remove()
    assert calls == [8, 8, 8]  # [uncond x 4, cond x 4] per step, not 4 runs


@pytest.fixture(scope="module")
def tiny_pipes_eager():
    loader = ModelLoader(device="cpu", trace=False)
    pipe = tiny_pipeline("sd")
    loader.add("sd", pipe)
    return loader, pipe.unet


def test_the_budget_counts_the_whole_batch(tiny_loader):
    from pipelines.limits import Limits

    limits = Limits(max_work=32 * 32 * 10 * 3)  # three 32x32 images of 10 steps
    ok = build_request(prompt="x", model="sd", loader=tiny_loader, num_inference_steps=10, width=32, height=32,
                       num_images_per_prompt=3, limits=limits)
    assert ok.num_images_per_prompt == 3
    with pytest.raises(ValueError, match=r"4 images of 32x32 x 10 steps .*\(at most 3 images per batch .*"
                                         r"PLAYGROUND_MAX_WORK"):
        build_request(prompt="x", model="sd", loader=tiny_loader, num_inference_steps=10, width=32, height=32,
                      num_images_per_prompt=4, limits=limits)
    for bad in (0, MAX_IMAGES_PER_PROMPT + 1, 2.5, "two"):
        with pytest.raises(ValueError, match=rf"num_images_per_prompt must be a whole number from 1 to "
                                             rf"{MAX_IMAGES_PER_PROMPT}|num_images_per_prompt must be a whole number"):
            build_request(prompt="x", model="sd", loader=tiny_loader, num_images_per_prompt=bad)
    assert build_request(prompt="x", model="sd", loader=tiny_loader, num_images_per_prompt=None).num_images_per_prompt == 1


def test_each_image_is_written_with_the_request_that_makes_it_alone(tiny_loader, tmp_path):
    request = GenerationRequest(prompt="a red circle", model="sd", num_inference_steps=3, guidance_scale=5.0, seed=20,
                                width=32, height=32, num_images_per_prompt=3)
    writer = TraceWriter(tmp_path, tiny_loader.previewer("sd"), {"x0": ("denoised", "fast")})
    result = generate(request, writer, loader=tiny_loader)
    trace = writer.finish(result)
    assert trace.images == ("image.png", "image_1.png", "image_2.png")
    read = Trace.read(tmp_path)  # the trace reads back with its batch
    assert read.images == trace.images and read.request.num_images_per_prompt == 3 and read.seed == 20
    for i, name in enumerate(trace.images):
        png = Image.open(tmp_path / name)
        alone = json.loads(png.text["request"])
        assert alone["seed"] == 20 + i and "num_images_per_prompt" not in alone  # one image, its own seed
        assert f"Seed: {20 + i}," in png.text["parameters"] and f"Batch size: 3, Batch pos: {i}" in png.text["parameters"]
        assert np.array_equal(pixels(png), pixels(result.images[i]))
        again = generate(GenerationRequest(**alone), loader=tiny_loader)  # what a PNG-info drop would run
        assert_same_image(again.image, png)
    # A trace whose images list does not match its request is refused, not half-read.
    data = json.loads((tmp_path / "trace.json").read_text())
    data["images"] = ["image.png", "../image_1.png", "image_2.png"]
    (tmp_path / "trace.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="images must name the batch's 3 files"):
        Trace.read(tmp_path)


def test_cli_writes_every_image_with_its_seed(tmp_path, capsys):
    from pipelines.__main__ import main

    out = tmp_path / "cli"
    status = main(["generate", "--prompt", "a small blue star in the top left", "--steps", "4", "--seed", "30",
                   "--num-images-per-prompt", "2", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "image_1.png" in printed and "seeds 30–31" in printed, printed
    trace = json.loads((out / "trace.json").read_text())
    assert trace["images"] == ["image.png", "image_1.png"] and trace["request"]["num_images_per_prompt"] == 2
    seeds = [json.loads(Image.open(out / name).text["request"])["seed"] for name in trace["images"]]
    assert seeds == [30, 31]
    # Image 1 is the single run with seed 31, as the CLI makes it.
    single = tmp_path / "single"
    assert main(["generate", "--prompt", "a small blue star in the top left", "--steps", "4", "--seed", "31",
                 "--out", str(single)]) == 0
    assert_same_image(Image.open(out / "image_1.png"), Image.open(single / "image.png"))
    assert main(["generate", "--prompt", "x", "--num-images-per-prompt", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "num_images_per_prompt must be a whole number from 1 to" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app on the embedded model; yields its URL."""
    from tests.serving import serve

    with serve(ModelLoader(device="cpu"), tmp_path_factory.mktemp("outputs"), preview_interval=0.05) as (url, demo):
        yield url


def test_http_api_batch_image_i_is_the_single_run_with_seed_plus_i(server):
    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(server, verbose=False)
    path, seed, info, images = client.predict(prompt="a yellow heart at the bottom", num_inference_steps=6, seed=40,
                                              num_images_per_prompt=3, api_name="/generate")
    assert seed == 40 and info["seeds"] == [40, 41, 42] and [i["caption"] for i in images] == [
        "seed 40", "seed 41", "seed 42"]
    assert np.array_equal(pixels(Image.open(path)), pixels(Image.open(images[0]["image"])))
    alone, seed2, info2, one = client.predict(prompt="a yellow heart at the bottom", num_inference_steps=6, seed=42,
                                              api_name="/generate")
    assert seed2 == 42 and info2["seeds"] == [42] and len(one) == 1
    assert_same_image(Image.open(images[2]["image"]), Image.open(alone))
    with pytest.raises(Exception, match="num_images_per_prompt must be a whole number from 1 to"):
        client.predict(prompt="x", num_images_per_prompt=99, api_name="/generate")


def test_browser_batch_shows_every_image_with_its_seed(server):
    from playwright.sync_api import sync_playwright

    from tests.serving import wait_until

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(server)
            page.wait_for_selector("#history")
            page.get_by_label("Prompt", exact=True).fill("a large green triangle on the right")
            page.get_by_label("Random seed").uncheck()
            seed = page.get_by_label("Seed", exact=True)
            seed.fill("50")
            batch = page.locator("#batch-size input[type=number]")
            batch.fill("3")
            batch.press("Enter")
            page.locator("#prompt-block button", has_text="Generate").click()
            status = page.locator("#live-status")
            wait_until(lambda: status.inner_text().startswith("Done"), 120, "the batch never finished")
            assert "3 images, seeds 50–52" in status.inner_text(), status.inner_text()
            gallery = page.locator("#batch")
            gallery.locator("img").nth(2).wait_for(timeout=30_000)
            assert gallery.locator("img").count() == 3
            captions = gallery.inner_text()
            assert "seed 50" in captions and "seed 52" in captions, captions
            page.screenshot(path=str(Path(os.environ.get("PLAYGROUND_SHOTS", "/tmp")) / "batch.png"))
        finally:
            browser.close()
