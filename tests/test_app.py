"""The playground UI, served for real around a tiny real pipeline: the HTTP API through gradio_client and
the page through Chromium (live previews change, the scrubber works, Stop stops)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.families import family_of
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.types import DEFAULT_MODEL, GenerationRequest
from tests.serving import serve
from tests.tiny import tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")

MODEL = "tiny-sd"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pipe):
    """The real app on a free port; yields (url, outputs folder, playground)."""
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, pipe)
    outputs = tmp_path_factory.mktemp("outputs")
    with serve(loader, outputs, models=[MODEL], preview_interval=0.05) as (url, demo):
        yield url, outputs, demo.playground


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def test_api_generate_returns_image_of_requested_size_and_seed(client, pipe):
    factor = family_of(pipe).size_multiple(pipe)
    width, height = 5 * factor, 3 * factor  # not square, not the model's own size
    path, seed, info, _ = client.predict(prompt="a red circle", width=width, height=height, num_inference_steps=3,
                                      seed=7, api_name="/generate")
    image = Image.open(path)
    assert image.size == (width, height)
    assert seed == 7 and info["steps_completed"] >= 3
    assert "Seed: 7" in image.info["parameters"] and f"Size: {width}x{height}" in image.info["parameters"]


def test_api_only_prompt_is_required_and_random_seed_is_reported(client):
    path, seed, info, _ = client.predict(prompt="", api_name="/generate")
    assert info["steps_completed"] == 51  # the stock SD pipeline's 50 steps (PNDM runs one more)
    assert Image.open(path).size == (32, 32)  # the tiny model's own size
    assert isinstance(seed, int) and seed >= 0
    assert f"Seed: {seed}" in Image.open(path).info["parameters"]


def test_api_size_not_a_multiple_names_the_factor(client, pipe):
    factor = family_of(pipe).size_multiple(pipe)
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(prompt="x", width=4 * factor + 1, num_inference_steps=2, api_name="/generate")
    assert f"multiple of {factor}" in str(err.value)


@pytest.mark.parametrize("kwargs,allowed", [
    (dict(scheduler="flow_euler"), "valid for this model: ddim"),
    (dict(scheduler="nope"), "valid for this model: ddim"),
    (dict(num_inference_steps=0), "from 1 to 1000"),
    (dict(guidance="nope"), "choose one of: cfg"),
    (dict(guidance="rescale", guidance_params='{"guidance_rescale": 2}'), "guidance_rescale must be in [0, 1]"),
    (dict(guidance_params="[1]"), "must be a JSON object"),
    (dict(model="stabilityai/other"), f"choose one of: {MODEL}"),
])
def test_api_bad_input_says_what_is_allowed_and_server_keeps_serving(client, kwargs, allowed):
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(prompt="x", api_name="/generate", **({"num_inference_steps": 2} | kwargs))
    assert allowed in str(err.value)
    assert "upstream" not in str(err.value)
    path, _, _, _ = client.predict(prompt="x", num_inference_steps=2, api_name="/generate")
    assert Path(path).is_file()


def test_history_and_code_come_from_disk(server, client):
    from ui.history import history

    _, outputs, _ = server
    client.predict(prompt="history check", num_inference_steps=2, seed=11, api_name="/generate")
    items = history(outputs)
    # The caption says what runs are compared by: scheduler, steps, guidance and seed.
    assert any("history check" in c and "pndm" in c and "2 steps" in c and "CFG 7.5" in c and "seed 11" in c
               for _, c in items), items
    trace = json.loads((Path(items[0][0]) / "trace.json").read_text())
    assert trace["request"]["prompt"] == "history check" and len(trace["steps"]) >= 2


def test_diffusers_code_reproduces_the_image(tmp_path, monkeypatch):
    """The "diffusers code" box, run as a script against the stock pipeline, makes the same pixels."""
    from ui.render import diffusers_code

    folder = tmp_path / "tiny-sd"
    tiny_pipeline("sd").save_pretrained(folder)
    loader = ModelLoader(device="cpu")
    request = GenerationRequest(prompt="a red circle", negative_prompt="blue", model=str(folder),
                                scheduler="dpmpp_2m_karras", num_inference_steps=4, guidance_scale=5.0, seed=3,
                                width=32, height=24, guidance="rescale", guidance_params={"guidance_rescale": 0.5})
    result = generate(request, loader=loader)
    code = diffusers_code(result, torch.float32, "cpu")
    assert "use_karras_sigmas=True" in code and "guidance_rescale=0.5" in code and "manual_seed(3)" in code
    # A folder outside the repository is named by its name alone (no server path): the script runs beside a copy.
    assert str(tmp_path) not in code and "'tiny-sd'" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "diffusers_code", "exec"), {})
    ours = np.asarray(result.image)
    stock = np.asarray(Image.open(tmp_path / "image.png"))
    assert ours.shape == stock.shape == (24, 32, 3)
    assert np.array_equal(ours, stock)  # the same pixels, not "within a level" (the script pins torch's threads)


def test_missing_embedded_model_says_so(tmp_path, monkeypatch):
    import dataclasses

    from pipelines.registry import MODELS
    from pipelines.requests import build_request

    # Point the registry's embedded entry at a folder that does not exist (a fresh clone without assets/).
    missing = dataclasses.replace(MODELS[DEFAULT_MODEL], source=str(tmp_path / "no-such-model"))
    monkeypatch.setitem(MODELS, DEFAULT_MODEL, missing)
    with pytest.raises(ValueError, match="not installed.*pick another model"):
        build_request(prompt="x", model=DEFAULT_MODEL, loader=ModelLoader(device="cpu"), num_inference_steps=2)


def test_unexpected_errors_name_only_their_type_and_bad_input_stays_as_is(tmp_path):
    """A client is told what was wrong with its input, but never a server path or a library's internals."""
    from ui.live import error_text

    internal = RuntimeError(f"cannot open {tmp_path}/x/unet/config.json: diffusers.models.unet_2d_condition")
    assert error_text(internal) == "Generation failed with an internal error (RuntimeError); the server has logged it."
    assert error_text(ValueError("steps must be 1..1000")) == "steps must be 1..1000"
    assert str(tmp_path) not in error_text(ValueError(f"[Errno 30] Read-only file system: '{tmp_path}/run'"), tmp_path)


def test_runs_share_one_long_lived_worker_thread(server, client):
    """Every run goes through the app's one generation worker (a fresh thread's first torch run was 3x slower)."""
    playground = server[2]
    ids = [client.predict(prompt="x", num_inference_steps=2, seed=seed, api_name="/generate")[2]["run"]
           for seed in (1, 2, 3)]
    threads = {playground.runs[i].thread for i in ids}
    assert threads == {playground.worker.thread} and playground.worker.thread.is_alive()


def _browser(playwright):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"])


def _src(page, selector: str) -> str | None:
    img = page.locator(f"{selector} img")
    return img.first.get_attribute("src") if img.count() else None


def _set_steps(page, n: int) -> None:
    box = page.get_by_label("Steps").first
    box.fill(str(n))
    box.press("Enter")


def _open(browser, url: str, prompt: str, steps: int, width: int = 1400, height: int = 1000):
    """A desktop page on the app with `prompt` typed and `steps` set; returns (page, status line)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.wait_for_selector("#history")
    page.get_by_label("Prompt", exact=True).fill(prompt)
    _set_steps(page, steps)
    return page, page.locator("#live-status")


def test_browser_live_previews_scrubber_stop_and_history(server, client):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, outputs, _ = server
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        # A run: the live x̂0 preview changes while it goes, then the scrubber appears.
        page, status = _open(browser, url, "a red circle", 250)
        page.get_by_label("Fast preview").check()  # cheap previews: their rate does not hang on CPU load
        page.locator("#prompt-block").get_by_role("button", name="Generate").click()
        seen: set[str] = set()
        deadline = time.time() + 60
        while time.time() < deadline and "Done" not in status.inner_text():
            src = _src(page, "#live-x0")
            if src:
                seen.add(src)
            time.sleep(0.03)
        assert "Done: 251 steps" in status.inner_text()  # PNDM runs N+1 iterations
        assert len(seen) >= 3, f"live x̂0 preview changed only {len(seen)} times"

        # Scrub back to step 1: the scrubbed x̂0 changes.
        page.wait_for_selector("#scrub", state="visible")
        before = _src(page, "#scrub-x0")
        page.locator("#scrub input[type=range]").focus()
        page.keyboard.press("Home")
        page.wait_for_function(
            "b => { const i = document.querySelector('#scrub-x0 img'); return i && i.src !== b; }", arg=before,
            timeout=20000)
        assert "Step 1 / 251" in page.locator("#step-info").inner_text()

        # Stop a long run midway, then another run completes.
        _set_steps(page, 500)
        page.get_by_label("Auto").check()  # VAE-decoded x̂0 from here on
        page.locator("#prompt-block").get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Step')",
                               timeout=20000)
        page.locator("#prompt-block").get_by_role("button", name="Stop").click()
        deadline = time.time() + 20
        stopped = []
        while time.time() < deadline and not stopped:
            traces = [json.loads(t.read_text()) for t in outputs.glob("*/trace.json")]
            stopped = [t for t in traces if t["cancelled"]]
            time.sleep(0.1)
        assert stopped and len(stopped[0]["steps"]) < 500
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Stopped at step')",
                               timeout=20000)
        _set_steps(page, 5)
        page.locator("#prompt-block").get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Done: 6 steps')",
                               timeout=30000)

        # The history (this browser's own runs, rebuilt from disk at page load) restores a past run's settings.
        client.predict(prompt="made elsewhere", num_inference_steps=2, seed=12, api_name="/generate")
        page.get_by_label("Prompt", exact=True).fill("history check")
        page.get_by_label("Random seed").uncheck()
        page.get_by_label("Seed", exact=True).fill("11")
        _set_steps(page, 2)
        page.locator("#prompt-block").get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Done: 3 steps')",
                               timeout=30000)
        page.locator("#history button", has_text="history check").first.wait_for(timeout=20000)
        page.reload()
        page.wait_for_selector("#history")
        item = page.locator("#history button", has_text="history check").first
        item.wait_for(timeout=20000)
        assert page.locator("#history button", has_text="made elsewhere").count() == 0  # not this browser's run
        item.click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Restored')",
                               timeout=20000)
        assert page.get_by_label("Prompt", exact=True).input_value() == "history check"
        page.get_by_text("diffusers code that reproduces this image").click()
        page.wait_for_function(
            "() => { const e = document.querySelector('#diffusers-code'); return e && e.innerText.includes('seed(11)'); }",
            timeout=10000)
        assert "prompt='history check'" in page.locator("#diffusers-code").inner_text()

        # Another visitor sees none of this browser's runs (private by default).
        other = browser.new_context().new_page()
        other.goto(url)
        # The history arrives with the page-load event; its label says when it has (and how many runs it holds).
        other.wait_for_function(
            "() => { const h = document.querySelector('#history'); return h && h.innerText.includes('Past runs:'); }",
            timeout=20000)
        assert "none yet from this browser" in other.locator("#history").inner_text()
        assert other.locator("#history button").count() == 0, other.locator("#history").inner_text()
        assert page.locator("#history button").count() >= 4  # while this one keeps its own
        browser.close()


def test_browser_errors_captions_notes_and_phone_layout(server, client):
    """What a user trips over: an error is said in the status line and clears stale previews; each panel's
    caption (below the picture, no label chip on it) names its preview kind; an empty prompt gets a note; on a
    phone the result comes right below Generate, before the settings."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url = server[0]
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page, status = _open(browser, url, "a red circle", 3)
        page.locator("#prompt-block").get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.startsWith('Done')",
                               timeout=30000)
        assert _src(page, "#final-image") and _src(page, "#live-x0")
        assert "VAE decode" in page.locator("#scrub-x0-caption").inner_text()  # the scrubber decodes (small image)
        assert "x_t ·" in page.locator("#live-latents-caption").inner_text()
        for panel in ("#live-latents", "#live-x0", "#final-image", "#scrub-x0"):
            labels = page.locator(f"{panel} [data-testid='block-label']")
            assert all(not labels.nth(i).is_visible() for i in range(labels.count())), panel

        # An error (a size this model cannot render): said in the status line, and no stale picture stays.
        width = page.get_by_label("Width").first
        width.fill("36")
        width.press("Enter")
        page.locator("#prompt-block").get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.querySelector('#live-status').innerText.includes('Error')",
                               timeout=30000)
        assert "not a multiple of 8" in status.inner_text()
        assert _src(page, "#final-image") is None and _src(page, "#live-x0") is None
        assert not page.locator("#scrub").is_visible()

        # An empty prompt is unconditional generation, and the page says so.
        page.get_by_label("Prompt", exact=True).fill("")
        page.wait_for_function("() => document.querySelector('#prompt-note').innerText.includes('Empty prompt')",
                               timeout=10000)

        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url)
        phone.wait_for_selector("#history")
        generate_y = phone.locator("#prompt-block").get_by_role("button", name="Generate").bounding_box()["y"]
        result_y = phone.locator("#live-status").bounding_box()["y"]
        settings_y = phone.locator("#model-note").bounding_box()["y"]
        assert generate_y < result_y < settings_y, (generate_y, result_y, settings_y)
        browser.close()


def test_restored_run_scrubs_from_its_saved_steps_after_a_restart(server, client, pipe, tmp_path):
    """A new app on the same outputs folder (a restart) rebuilds a past run's scrubber from steps/tensors.safetensors."""
    import app
    from pipelines.outputs import Trace
    from pipelines.previews import colour_error

    _, outputs, _ = server
    _, _, info, _ = client.predict(prompt="a red circle", num_inference_steps=4, seed=5, api_name="/generate")
    folder = Path(outputs) / info["run"]
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, pipe)
    fresh = app.build_demo(loader=loader, models=[MODEL], outputs_dir=outputs).playground
    assert info["run"] not in fresh.runs
    run = fresh.restore(folder, Trace.read(folder))
    assert run is not None and len(run.steps) == len(Trace.read(folder).steps) == 5  # PNDM: N + 1
    last = np.asarray(Image.open(fresh.render(run, len(run.steps) - 1, "x0")).convert("RGB"))
    final = np.asarray(Image.open(folder / "image.png").convert("RGB"))
    first = np.asarray(Image.open(fresh.render(run, 0, "x0")).convert("RGB"))
    factor = last.shape[0] // final.shape[0]
    assert colour_error(last[::factor, ::factor], final, 1) < 0.02 < colour_error(first[::factor, ::factor], final, 1)
