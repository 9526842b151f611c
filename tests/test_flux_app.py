"""Flux in the app (issue 25, item 1): true_cfg_scale through the HTTP API (the same image as generate() with the
same request), refused for other families; the page shows the true CFG slider and the note on distilled guidance
against true CFG only for a Flux model, and a run from the page sends the slider's value."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.types import GenerationRequest
from tests.serving import serve, wait_until
from tests.test_app import _browser
from tests.tiny import tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")

SHOTS = Path(os.environ.get("PLAYGROUND_SHOTS", "/tmp/shots-flux"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app with a tiny SD and a tiny Flux (dev-shaped); yields (url, outputs folder, loader)."""
    loader = ModelLoader(device="cpu")
    loader.add("sd", tiny_pipeline("sd"))
    loader.add("flux", tiny_pipeline("flux"))
    outputs = tmp_path_factory.mktemp("outputs")
    with serve(loader, outputs, models=["sd", "flux"], default_model="sd", preview_interval=0.05) as (url, demo):
        yield url, outputs, loader


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def test_api_true_cfg_gives_the_image_generate_gives(server, client):
    url, outputs, loader = server
    image, seed, info, _ = client.predict(prompt="a red circle", negative_prompt="blue", model="flux",
                                          num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=3.0, seed=5,
                                          width=32, height=32, api_name="/generate")
    assert seed == 5 and info["family"] == "flux"
    trace = json.loads((outputs / info["run"] / "trace.json").read_text())
    assert trace["request"]["true_cfg_scale"] == 3.0
    expected = generate(GenerationRequest("a red circle", negative_prompt="blue", model="flux", num_inference_steps=3,
                                          guidance_scale=3.5, true_cfg_scale=3.0, seed=5, width=32, height=32),
                        loader=loader)
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), np.asarray(expected.image))
    plain = generate(GenerationRequest("a red circle", negative_prompt="blue", model="flux", num_inference_steps=3,
                                       guidance_scale=3.5, seed=5, width=32, height=32), loader=loader)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(expected.image)), "true CFG must show"


def test_api_refuses_true_cfg_for_other_families(client):
    with pytest.raises(Exception, match="true_cfg_scale is for Flux models"):
        client.predict(prompt="a red circle", model="sd", num_inference_steps=2, true_cfg_scale=2.0, seed=1,
                       api_name="/generate")


def test_page_shows_true_cfg_and_the_guidance_note_for_flux_only(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, outputs, _ = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        for name, viewport in (("desktop", {"width": 1440, "height": 900}), ("phone", {"width": 390, "height": 844})):
            page = browser.new_page(viewport=viewport)
            page.goto(url)
            page.wait_for_selector("#history")
            note, slider = page.locator("#flux-guidance-note"), page.locator("#true-cfg-scale")
            assert not note.is_visible() and not slider.is_visible()  # SD: one guidance scale, CFG
            page.get_by_label("Model").first.click()
            page.get_by_role("option", name=re.compile(r"^flux\b")).click()
            note.wait_for(state="visible", timeout=20000)
            slider.wait_for(state="visible", timeout=20000)
            assert "distilled" in note.inner_text() and "True CFG" in note.inner_text()
            note.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / f"flux-{name}.png"), full_page=False)
            if name == "desktop":  # a run from the page sends the slider's value
                page.get_by_label("Prompt", exact=True).fill("a red circle")
                page.get_by_label("Negative prompt").fill("blue")
                steps = page.get_by_label("Steps").first
                steps.fill("2")
                steps.press("Tab")
                box = slider.get_by_role("spinbutton")
                box.fill("2.5")
                box.press("Tab")
                page.locator("#prompt-block").get_by_role("button", name="Generate").click()

                def flux_trace():
                    traces = [json.loads(t.read_text()) for t in outputs.glob("*/trace.json")]
                    return [t for t in traces if t["request"]["model"] == "flux" and
                            t["request"]["prompt"] == "a red circle" and t["request"]["num_inference_steps"] == 2]

                wait_until(flux_trace, 60, "a Flux run from the page")
                assert flux_trace()[0]["request"]["true_cfg_scale"] == 2.5
                # Back to SD: the Flux controls go away again
                page.get_by_label("Model").first.click()
                page.get_by_role("option", name=re.compile(r"^sd\b")).click()
                note.wait_for(state="hidden", timeout=20000)
                assert not slider.is_visible()
            page.close()
        browser.close()


def test_dissection_says_which_guidance_a_flux_run_had(client):
    """The Explain lab's dissection: true CFG shows both passes and names both scales; distilled guidance alone is one
    pass, and the status says why (not 'guidance scale ≤ 1', which Flux's 3.5 is not)."""
    common = dict(prompt="a red circle", negative_prompt="blue", model="flux", num_inference_steps=2,
                  guidance_scale=3.5, seed=2, randomize_seed=False, width=32, height=32)
    both = client.predict(**common, true_cfg_scale=3.0, api_name="/explain_dissect")
    assert both[0].startswith("Done") and "true CFG scale 3, distilled guidance 3.5" in both[0]
    assert all(s["guided"] for s in both[-1]["steps"]) and both[-1]["request"]["true_cfg_scale"] == 3.0
    one = client.predict(**common, api_name="/explain_dissect")
    assert "distilled guidance (scale 3.5) is an input to the model: one pass per step" in one[0]
    assert not any(s["guided"] for s in one[-1]["steps"])
