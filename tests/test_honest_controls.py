"""Honest controls, choices that fit the model, and words and code a visitor sees (issue 23, items 4-6): a typed value
outside a slider's range is refused with the range, never clamped out of sight; LCM is offered only to
consistency-distilled models, on every entry point; a size other than the model's own gets a note; messages end on a
whole word and count in the right number; no server path or source-file name reaches the page; the copied diffusers
code makes the app's very pixels, PAG included."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from pipelines.errors import MAX_MESSAGE_CHARS, one_line
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import Trace
from pipelines.profile import fitting_schedulers, size_note
from pipelines.registry import MODELS
from pipelines.schedulers import compatible_keys, why_not
from pipelines.types import DEFAULT_MODEL, GenerationRequest
from pipelines.words import counted
from tests.serving import serve
from tests.tiny import tiny_pipeline
from ui.controls import guidance_range, offline_hint
from ui.render import ROOT, diffusers_code, display_source
from ui.sliders import StrictSlider

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app around the embedded model (the default run) and a tiny SD: yields (url, outputs, demo)."""
    loader = ModelLoader(device="cpu")
    loader.add("tiny-sd", tiny_pipeline("sd"))
    outputs = tmp_path_factory.mktemp("outputs")
    with serve(loader, outputs, models=[DEFAULT_MODEL, "tiny-sd"], preview_interval=0.05) as (url, demo):
        yield url, outputs, demo


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def tiny_lcm() -> StableDiffusionPipeline:
    """The tiny SD pipeline with a guidance-embedding UNet (time_cond_proj_dim, as LCM-distilled SD has) and its own
    PNDM scheduler: LCM must be offered for the UNet alone."""
    pipe = tiny_pipeline("sd")
    torch.manual_seed(0)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}  # "_use_default_values" would win
    unet = UNet2DConditionModel.from_config(config | {"time_cond_proj_dim": 8}).eval()
    out = StableDiffusionPipeline(**(pipe.components | {"unet": unet}))
    out.set_progress_bar_config(disable=True)
    return out


def _browser(playwright):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"])


def _runs(outputs: Path) -> set[str]:
    return {p.parent.name for p in outputs.glob("*/trace.json")}


# -- 4. honest controls ----------------------------------------------------------------------------------------------


def test_every_slider_on_the_page_refuses_out_of_range_values_naming_its_range(server):
    demo = server[2]
    sliders = [b for b in demo.blocks.values() if isinstance(b, gr.Slider)]
    assert len(sliders) >= 10 and all(isinstance(b, StrictSlider) for b in sliders), \
        [b.label for b in sliders if not isinstance(b, StrictSlider)]
    rescale = StrictSlider(0, 1, value=0.7, step=0.01, label="guidance_rescale")
    assert rescale.preprocess(1.0) == 1.0
    for typed, shown in ((2, "got 2"), (-0.5, "got -0.5")):
        with pytest.raises(gr.Error) as err:
            rescale.preprocess(typed)
        assert "guidance_rescale must be from 0 to 1" in err.value.message and shown in err.value.message


def test_browser_typed_values_outside_the_range_are_refused_not_clamped(server):
    """Guidance past the slider's end (15 where it ends at 8, the embedded model's) and 1001 steps, then Generate:
    nothing runs, the boxes keep what was typed, and the page names each range in turn; once in range, the run uses
    exactly the typed values."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url, outputs, demo = server
    high = guidance_range(MODELS[DEFAULT_MODEL].guidance_scale)[1]
    typed = f"{high + 7:g}"
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(url)
        page.wait_for_selector("#history")
        page.locator("#prompt-block textarea").first.fill("a large red circle in the center")
        steps = page.get_by_label("number input for Steps")
        scale = page.get_by_label("number input for Guidance scale")
        generate_btn = page.locator("#prompt-block").get_by_role("button", name="Generate")
        before = _runs(outputs)

        def refused(expected: str) -> None:
            generate_btn.click()
            toast = page.locator(".toast-body", has_text=expected)
            toast.first.wait_for(timeout=20000)
            page.locator(".toast-body").first.get_by_role("button").first.click()  # closed for the next one
            assert demo.playground.pending == [] and _runs(outputs) == before, "a refused value started a run"

        scale.fill(typed)
        steps.fill("1001")
        refused("Steps must be from 1 to 1000, got 1001")
        assert (steps.input_value(), scale.input_value()) == ("1001", typed)  # not clamped to 1000 / the end
        assert steps.evaluate("b => b.matches(':out-of-range')")  # drawn in red
        steps.fill("0")
        refused("Steps must be from 1 to 1000, got 0")
        steps.fill("3")
        refused(f"Guidance scale must be from 0 to {high:g}, got {typed}")
        assert scale.input_value() == typed
        scale.fill("4.5")
        generate_btn.click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Done: 3 steps')",
                               timeout=60000)
        made = _runs(outputs) - before
        assert len(made) == 1
        request = Trace.read(outputs / made.pop()).request
        assert (request.num_inference_steps, request.guidance_scale) == (3, 4.5)
        assert (steps.input_value(), scale.input_value()) == ("3", "4.5")
        browser.close()


# -- 5. fit for the model --------------------------------------------------------------------------------------------


def test_lcm_is_offered_only_to_consistency_distilled_models(tmp_path):
    plain, lcm = tiny_pipeline("sd"), tiny_lcm()
    assert "lcm" not in compatible_keys(plain.scheduler, plain.unet.config)
    assert "latent-consistency-distilled" in why_not("lcm", plain.scheduler, plain.unet.config)
    assert "lcm" in compatible_keys(lcm.scheduler, lcm.unet.config)  # the UNet says so
    assert "lcm" in compatible_keys(LCMScheduler.from_config(plain.scheduler.config))  # a shipped LCMScheduler says so
    # The embedded model, before and after it loads: the profile's rule, read from its folder or its pipeline.
    loader = ModelLoader(device="cpu")
    before = fitting_schedulers(DEFAULT_MODEL, None)
    after = fitting_schedulers(DEFAULT_MODEL, loader.get(DEFAULT_MODEL))
    assert before == after == loader.profile(DEFAULT_MODEL).schedulers and "lcm" not in before
    assert "lumpy, misshapen shapes" in loader.profile(DEFAULT_MODEL).refused["lcm"]
    lcm.save_pretrained(tmp_path / "lcm")  # a folder says so without loading its weights
    assert "lcm" in fitting_schedulers(str(tmp_path / "lcm"), None)


def test_lcm_on_a_distilled_model_matches_the_stock_pipeline():
    loader = ModelLoader(device="cpu")
    loader.add("lcm", tiny_lcm())
    request = GenerationRequest("a red circle", model="lcm", scheduler="lcm", num_inference_steps=4, guidance_scale=5.0,
                                seed=3, width=32, height=32)
    ours = generate(request, loader=loader)
    stock = tiny_lcm()
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    image = stock("a red circle", num_inference_steps=4, guidance_scale=5.0, width=32, height=32,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert ours.scheduler == "lcm"
    assert np.array_equal(np.asarray(ours.image), np.asarray(image))


def test_lcm_on_the_embedded_model_is_refused_by_the_api_the_cli_and_generate(client, tmp_path, capsys):
    from pipelines.__main__ import main

    why = "LCM needs a latent-consistency-distilled model"
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(prompt="x", scheduler="lcm", num_inference_steps=2, api_name="/generate")
    assert why in str(err.value) and str(err.value).endswith("valid for this model: ddim, ddpm, euler, euler_a, "
                                                              "dpmpp_2m, unipc")
    assert main(["generate", "--prompt", "x", "--scheduler", "lcm", "--steps", "2", "--out", str(tmp_path)]) == 2
    assert why in capsys.readouterr().err
    with pytest.raises(ValueError, match=why):
        generate(GenerationRequest("x", model=DEFAULT_MODEL, scheduler="lcm", num_inference_steps=2),
                 loader=ModelLoader(device="cpu"))


def test_a_size_other_than_the_models_own_gets_a_note():
    assert size_note(64, 64, 64) == ""
    assert "trained at 64×64; at 128×128 expect repeated" in size_note(64, 128, 128)
    assert "never saw images this small" in size_note(512, 256, 256)
    assert "stretched" in size_note(512, 768, 256)


def test_browser_size_note_follows_width_and_height(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(server[0])
        page.wait_for_selector("#history")
        note = page.locator("#size-note")
        width = page.get_by_label("number input for Width")
        for typed, expected in (("128", "at 128×64 expect repeated"), ("64", None), ("32", "at 32×64")):
            width.fill(typed)
            width.press("Tab")  # the box's release event
            if expected:
                page.wait_for_function("t => document.querySelector('#size-note').innerText.includes(t)",
                                       arg=expected, timeout=10000)
            else:
                page.wait_for_function("() => document.querySelector('#size-note').innerText.trim() === ''",
                                       timeout=10000)
        assert "trained at 64×64" in note.inner_text()
        browser.close()


# -- 6. words and code -----------------------------------------------------------------------------------------------


def test_a_long_message_ends_on_a_whole_word():
    detail = ("Cannot load model org/x: the model is not fully cached locally (Cannot find an appropriate cached "
              "snapshot folder for the specified revision on the local disk and outgoing traffic has been disabled. "
              "To enable repo look-ups and downloads online, pass 'local_files_only=False' as input.)")
    ours = "model 'x' is not downloaded on this server; run `hf download org/x` where there is network. "
    cut = one_line(ours + detail)
    assert len(cut) <= MAX_MESSAGE_CHARS and cut.endswith("has been disabled.")  # the last whole sentence that fits
    assert "To" not in cut.split()[-3:]
    words = one_line("word " * 100)
    assert len(words) <= MAX_MESSAGE_CHARS and words.endswith("word…")
    assert one_line("short and whole") == "short and whole"


def test_counts_take_the_number_they_count():
    assert (counted(1, "step"), counted(2, "step"), counted(0, "image")) == ("1 step", "2 steps", "0 images")
    assert counted(1, "branch", "branches") == "1 branch" and counted(3, "branch", "branches") == "3 branches"
    # No f-string in the UI or the pipelines puts a bare count before "steps" ("Done: 1 steps").
    bare = re.compile(r"\{[^{}]+\} steps\b")
    found = [f"{path.relative_to(ROOT)}:{i}" for folder in ("ui", "pipelines") for path in (ROOT / folder).rglob("*.py")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if bare.search(line) and not line.lstrip().startswith("#")]
    assert not found, found


def test_an_uncached_hub_model_is_never_promised_a_download(monkeypatch):
    from huggingface_hub import constants

    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        hint = offline_hint("sd-1.5")
        assert "not downloaded" in hint or "not in the local Hugging Face cache" in hint, hint
        assert "downloads it" not in hint and "first run" not in hint, hint


def test_the_page_shows_no_server_path_and_no_source_file(server):
    """The model note names the embedded folder relative to the repository; nothing on the page names a .py file
    or an absolute path on the server (the repository, the outputs folder)."""
    url, outputs, demo = server
    props = json.dumps([c.get("props", {}) for c in demo.config["components"]], default=str)
    assert "`assets/models/tiny-shapes`" in props
    assert str(ROOT) not in props and str(outputs) not in props
    assert not re.findall(r"[\w/]+\.py\b", props)
    assert display_source(DEFAULT_MODEL) == "assets/models/tiny-shapes"


def _run_script(code: str, where: Path, threads: int) -> None:
    """Run a copied script in `where` as a visitor would, with torch's thread count at `threads` (a machine's own
    default; the script pins the run's)."""
    before, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(threads)
    os.chdir(where)
    try:
        exec(compile(code, "diffusers_code", "exec"), {})
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)


def test_copied_code_of_the_default_run_makes_the_apps_very_pixels(server, client, tmp_path):
    """The default run (the embedded model, its settings) made by the app's worker, and the code its page offers, run
    from a checkout's root on two threads: the same pixels. Without the script's set_num_threads(1) this prompt and
    seed differ by one level on a pixel on a two-core CPU (float sums split per thread)."""
    url, outputs, demo = server
    info = client.predict(prompt="a yellow heart at the bottom", seed=0, api_name="/generate")[2]
    run = demo.playground.runs[info["run"]]
    code = diffusers_code(run.result, run.previewer.pipe.dtype, "cpu")  # what the page's code box shows
    assert f"torch.set_num_threads({run.result.threads})" in code
    assert "from_pretrained('assets/models/tiny-shapes')" in code and str(ROOT) not in code
    assert Trace.read(outputs / info["run"]).threads == run.result.threads  # a restored run's code pins it too
    checkout = tmp_path / "checkout"
    (checkout / "assets" / "models").mkdir(parents=True)
    (checkout / "assets" / "models" / "tiny-shapes").symlink_to(ROOT / "assets" / "models" / "tiny-shapes")
    _run_script(code, checkout, threads=2)
    ours = np.asarray(Image.open(outputs / info["run"] / "image.png").convert("RGB"))
    stock = np.asarray(Image.open(checkout / "image.png").convert("RGB"))
    assert np.array_equal(ours, stock), f"{int((ours != stock).sum())} values differ"


@pytest.mark.parametrize("scale,params", [(5.0, {"pag_scale": 2.5}), (1.0, {}), (4.0, {"pag_adaptive_scale": 0.002})])
def test_copied_pag_code_goes_through_diffusers_pag_pipeline_and_makes_the_same_pixels(tmp_path, scale, params):
    folder = tmp_path / "tiny-sd"
    tiny_pipeline("sd").save_pretrained(folder)
    request = GenerationRequest("a red circle", model=str(folder), num_inference_steps=3, guidance_scale=scale, seed=5,
                                width=32, height=32, guidance="pag", guidance_params=params)
    result = generate(request, loader=ModelLoader(device="cpu"))
    code = diffusers_code(result, torch.float32, "cpu")
    assert "AutoPipelineForText2Image" in code and "enable_pag=True, pag_applied_layers=['mid']" in code
    assert f"pag_scale={params.get('pag_scale', 3):g}" in code and "no stock route" not in code
    assert str(tmp_path) not in code and "'tiny-sd'" in code  # a folder outside the repository: by its name
    _run_script(code, tmp_path, threads=torch.get_num_threads())
    assert np.array_equal(np.asarray(result.image), np.asarray(Image.open(tmp_path / "image.png")))
