"""PNG info, ♻ reuse seed and Ctrl/Cmd+Enter: the parser on our PNGs (made by generate() on tiny real pipelines) and
on AUTOMATIC1111 texts; the real app's /png_info through gradio_client; the page in Chromium (a PNG dropped restores
its settings and regenerates the same pixels, a pasted text fills the controls, refused files are never kept, ♻,
Ctrl+Enter)."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import save_image, save_png
from pipelines.pnginfo import (MAX_PNG_BYTES, PNG_SIGNATURE, parse_parameters, png_text, read_png_info,
                               scheduler_for)
from pipelines.types import GenerationRequest
from tests.serving import Visitor, serve, wait_until
from tests.tiny import tiny_pipeline
from ui.pnginfo import sweep_uploads, take_upload

gradio_client = pytest.importorskip("gradio_client")

MODEL = "tiny-sd"


def _png(text: dict[str, str] | None = None, *, zipped: bool = False) -> bytes:
    """A small PNG in memory with `text` chunks (tEXt, or iTXt where the text is not Latin-1; zTXt when zipped)."""
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v, zip=zipped)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def loader():
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    loader.add("tiny-sd3", tiny_pipeline("sd3"))
    return loader


# -- our PNGs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_kwargs", [
    dict(prompt="a red circle", negative_prompt="blue", scheduler="dpmpp_2m_karras", guidance="rescale",
         guidance_params={"guidance_rescale": 0.5}, width=40, height=24),
    dict(prompt="a small star", scheduler="euler_a", guidance_scale=3.0, seed=None),
    dict(prompt="", scheduler=None, guidance="apg", guidance_params={"eta": 0.5, "momentum": -0.25}),
    dict(prompt="flow", model="tiny-sd3", scheduler="flow_euler", guidance_scale=2.0),
])
def test_our_png_gives_back_its_request_and_its_parameters_text_the_same_settings(tmp_path, loader, request_kwargs):
    request = GenerationRequest(**({"model": MODEL, "num_inference_steps": 2, "seed": 11} | request_kwargs))
    result = generate(request, loader=loader)
    data = save_image(tmp_path / "image.png", result).read_bytes()

    info = read_png_info(data)
    assert info["source"] == "request" and info["notes"] == []
    expected = request.to_dict() | {"seed": result.seed, "num_images_per_prompt": 1}
    assert {k: v for k, v in info.items() if k not in ("source", "notes")} == expected

    # The same image with only its A1111 text (as another tool might keep it): the same settings, where the text
    # names them (sizes as rendered, the scheduler used, which the request may leave to the model).
    text = png_text(data)["parameters"]
    alone = read_png_info(save_png(tmp_path / "a1111.png", result.image, {"parameters": text}).read_bytes())
    assert alone["source"] == "parameters"
    assert {k: alone[k] for k in ("prompt", "negative_prompt", "model", "num_inference_steps", "guidance_scale",
                                  "seed", "guidance", "guidance_params")} == {
        k: expected[k] for k in ("prompt", "negative_prompt", "model", "num_inference_steps", "guidance_scale", "seed",
                                 "guidance", "guidance_params")}
    assert (alone["width"], alone["height"]) == (result.width, result.height)
    # A1111 labels Euler the same for both schedule kinds: the discrete key comes back (the page picks the one that
    # fits the model); every other sampler comes back as itself.
    assert alone["scheduler"] == {"flow_euler": "euler"}.get(result.scheduler, result.scheduler)


def test_each_image_of_our_batch_gives_back_the_settings_that_make_it_alone(tmp_path, loader):
    request = GenerationRequest(prompt="a red circle", model=MODEL, num_inference_steps=2, seed=40,
                                num_images_per_prompt=3)
    result = generate(request, loader=loader)
    data = save_image(tmp_path / "second.png", result, index=1).read_bytes()
    ours = read_png_info(data)
    assert ours["seed"] == 41 and ours["num_images_per_prompt"] == 1 and ours["notes"] == []
    text = read_png_info(_png({"parameters": png_text(data)["parameters"]}))
    assert text["seed"] == 41 and text["num_images_per_prompt"] == 1
    assert text["notes"] == ["the image is number 1 of a batch of 3; its own seed makes it alone (set the batch size "
                             "to make the rest)"]


def test_a_broken_request_chunk_falls_back_to_the_parameters_text_with_a_note():
    text = "a red circle\nSteps: 4, Sampler: DDIM, CFG scale: 5, Seed: 3, Size: 32x32, Model: tiny-sd"
    info = read_png_info(_png({"request": '{"prompt": "x", "num_inference_steps": 0}', "parameters": text}))
    assert info["source"] == "parameters" and info["num_inference_steps"] == 4 and info["scheduler"] == "ddim"
    assert any("request chunk cannot be read" in n and "num_inference_steps" in n for n in info["notes"])
    with pytest.raises(ValueError, match="request chunk cannot be read: it is not JSON"):
        read_png_info(_png({"request": "{not json"}))


def test_text_chunks_of_every_kind_are_read_without_decoding_pixels():
    text = "un cœur jaune ★\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8"
    for zipped in (False, True):  # iTXt (not Latin-1), plain or compressed; zTXt / tEXt for Latin-1
        assert read_png_info(_png({"parameters": text}, zipped=zipped))["prompt"] == "un cœur jaune ★"
        latin = text.replace(" ★", "")
        assert read_png_info(_png({"parameters": latin}, zipped=zipped))["prompt"] == "un cœur jaune"


@pytest.mark.parametrize("data,message", [
    (b"", "not a PNG file (it is empty)"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 64, "it is a JPEG; AUTOMATIC1111 keeps a JPEG's parameters in EXIF"),
    (b"RIFF\0\0\0\0WEBPVP8 ", "it is a WebP"),
    (b"hello, this is text", "does not start with the PNG signature"),
    (_png(), "carries no generation settings"),
    (_png({"Comment": "made elsewhere"}), "carries no generation settings"),
    (_png({"parameters": "a red circle"}), "not a parameters text: an AUTOMATIC1111 parameters text is the prompt"),
    (_png({"parameters": "x"})[:40], "the PNG is truncated"),
    (PNG_SIGNATURE + b"\0\0\0\0IEND\0\0\0\0", "the PNG is damaged (its 'IEND' chunk fails its checksum)"),
    (PNG_SIGNATURE + os.urandom(MAX_PNG_BYTES), f"PNG info reads PNGs of at most {MAX_PNG_BYTES} bytes"),
])
def test_anything_else_is_refused_with_a_line_saying_what_is_read(data, message):
    with pytest.raises(ValueError) as err:
        read_png_info(data)
    assert message in str(err.value)


def test_a_text_chunk_that_inflates_past_the_bound_is_refused():
    bomb = zlib.compress(b"a" * (10 * 2**20))  # 10 MB of text in ~10 KB
    chunk = b"parameters\0\0" + bomb
    body = b"zTXt" + chunk
    data = _png()[:33] + len(chunk).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big") + _png()[33:]
    with pytest.raises(ValueError, match="inflates past"):
        read_png_info(data)


# -- AUTOMATIC1111 texts -------------------------------------------------------------------------------------------

A1111 = ("masterpiece, a cat\non a mat\nNegative prompt: blurry, lowres\nugly\nSteps: 28, Sampler: DPM++ 2M, "
         "Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, Model hash: 6ce0161689, "
         'Model: v1-5-pruned-emaonly, Lora hashes: "cat: a1b2, mat: c3d4", Version: v1.10.1')


def test_an_a1111_text_with_a_negative_prompt():
    info = parse_parameters(A1111)
    assert info["prompt"] == "masterpiece, a cat\non a mat"
    assert info["negative_prompt"] == "blurry, lowres\nugly"
    assert {k: info[k] for k in ("num_inference_steps", "scheduler", "guidance_scale", "seed", "width", "height",
                                 "model", "guidance", "guidance_params")} == dict(
        num_inference_steps=28, scheduler="dpmpp_2m_karras", guidance_scale=6.5, seed=3141592653, width=512,
        height=768, model="v1-5-pruned-emaonly", guidance="cfg", guidance_params={})
    assert info["notes"] == ["ignored (no such setting here): Model hash, Lora hashes, Version"]


def test_an_a1111_text_without_negative_prompt_and_with_sampler_labels():
    info = parse_parameters("a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64")
    assert info["prompt"] == "a dog" and info["negative_prompt"] == "" and info["scheduler"] == "euler_a"
    assert "model" not in info and info["notes"] == []
    # The settings line alone (an empty prompt) is a parameters text too.
    assert parse_parameters("Steps: 5, Sampler: DDIM, CFG scale: 1, Seed: 2")["prompt"] == ""


@pytest.mark.parametrize("sampler,schedule,key,note", [
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras", None),
    ("DPM++ 2M Karras", "", "dpmpp_2m_karras", None),  # A1111 before 1.9: the schedule in the sampler's label
    ("DPM++ 2M", "Automatic", "dpmpp_2m", None),
    ("Euler a", "", "euler_a", None), ("euler a", "", "euler_a", None), ("Euler", "", "euler", None),
    ("DDIM", "", "ddim", None), ("PLMS", "", "pndm", None), ("UniPC", "", "unipc", None), ("LMS", "", "lms", None),
    ("Heun", "", "heun", None), ("LCM", "", "lcm", None), ("DDPM", "", "ddpm", None),
    ("Euler a", "Karras", "euler_a", "Euler a with the Karras schedule is not offered here"),
    ("DPM++ 2M", "Exponential", "dpmpp_2m", "schedule type 'Exponential' is not offered here"),
    ("DPM++ SDE", "Karras", None, "sampler 'DPM++ SDE' is not offered here (DDIM, DDPM, PLMS"),
])
def test_samplers_are_matched_by_a1111_label(sampler, schedule, key, note):
    got, got_note = scheduler_for(sampler, schedule)
    assert got == key
    assert (got_note is None) if note is None else (note in got_note)


def test_unknown_keys_and_samplers_are_ignored_with_a_note():
    info = parse_parameters("x\nSteps: 9, Sampler: DPM++ 3M SDE, CFG scale: 7, Seed: 4, Size: 32x32, "
                            "Denoising strength: 0.7, Hires upscale: 2, Clip skip: 2, Stopped at step: 5")
    assert "scheduler" not in info and info["num_inference_steps"] == 9
    assert any("sampler 'DPM++ 3M SDE' is not offered here" in n and "model's own scheduler" in n
               for n in info["notes"])
    ignored = "ignored (no such setting here): Denoising strength, Hires upscale, Clip skip, Stopped at step"
    assert ignored in info["notes"]
    assert any("stopped at step 5" in n for n in info["notes"])


def test_our_guidance_fields_and_a1111_cfg_rescale():
    ours = parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 32x32, "
                            "Guidance: interval sigma_hi=3 sigma_lo=0.5")
    assert ours["guidance"] == "interval" and ours["guidance_params"] == {"sigma_hi": 3.0, "sigma_lo": 0.5}
    phi = parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, CFG Rescale phi: 0.7")
    assert phi["guidance"] == "rescale" and phi["guidance_params"] == {"guidance_rescale": 0.7}
    assert parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Batch size: 4")["num_images_per_prompt"] == 4
    # One image of a batch (A1111 and our parameters text give it its own seed): that image alone, as our request.
    one = parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 12, Batch size: 4, Batch pos: 2")
    assert one["num_images_per_prompt"] == 1 and one["seed"] == 12
    assert one["notes"] == ["the image is number 2 of a batch of 4; its own seed makes it alone (set the batch size "
                            "to make the rest)"]


@pytest.mark.parametrize("text,message", [
    ("", "not a parameters text: an AUTOMATIC1111 parameters text is the prompt, an optional 'Negative prompt: …' "
         "line, then one line of settings such as 'Steps: 20"),
    ("just a prompt, nothing else", "not a parameters text"),
    ("Title: a, Author: b, Year: c", "not a parameters text"),  # key: value pairs, none of A1111's
    ("x\nSteps: many, Sampler: DDIM, CFG scale: 7", "Steps must be a whole number, got 'many'"),
    ("x\nSteps: 0, Sampler: DDIM, CFG scale: 7", "Steps must be a whole number from 1 to 1000, got 0"),
    ("x\nSteps: 2, Sampler: DDIM, CFG scale: -1", "CFG scale must be a number >= 0"),
    ("x\nSteps: 2, Sampler: DDIM, Size: big", "Size must be WIDTHxHEIGHT such as 512x768, got 'big'"),
    ("x\nSteps: 2, Sampler: DDIM, Seed: -1", "Seed must be a whole number from 0 to"),
    ("x\nSteps: 2, Sampler: DDIM, Guidance: magic", "Guidance 'magic' is not a method here; choose one of: cfg"),
    ("x\nSteps: 2, Sampler: DDIM, Guidance: rescale guidance_rescale=2", "guidance_rescale must be in [0, 1]"),
    ("x" * 300_000, "a parameters text here is at most"),
])
def test_garbage_is_refused_with_a_line_saying_what_a_parameters_text_looks_like(text, message):
    with pytest.raises(ValueError) as err:
        parse_parameters(text)
    assert message in str(err.value)


# -- the real app: /png_info ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app around a tiny SD pipeline, with its own Gradio upload folder; yields (url, outputs, uploads,
    demo)."""
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    outputs = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(uploads))
        with serve(loader, outputs, models=[MODEL], preview_interval=0.05) as (url, demo):
            assert Path(demo.server_app.uploaded_file_dir) == uploads
            yield url, outputs, uploads, demo


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server[0], verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _holding(folder: Path, data: bytes) -> list[Path]:
    """Files under `folder` whose bytes are `data`."""
    return [p for p in _files(folder) if p.stat().st_size == len(data) and p.read_bytes() == data]


def _our_png(tmp_path: Path, **kwargs) -> tuple[Path, GenerationRequest, int]:
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    request = GenerationRequest(**({"prompt": "a red circle", "model": MODEL, "num_inference_steps": 2, "seed": 21}
                                   | kwargs))
    result = generate(request, loader=loader)
    return save_image(tmp_path / "ours.png", result), request, result.seed


def test_api_png_info_reads_a_png_or_a_text_and_keeps_no_upload(server, client, tmp_path):
    """/png_info gives a PNG's settings written as /generate's parameters: fed back, they make the same pixels."""
    _, outputs, uploads, demo = server
    path = client.predict(prompt="a red circle", negative_prompt="blue", scheduler="ddim", num_inference_steps=3,
                          guidance_scale=4, guidance="rescale", guidance_params='{"guidance_rescale": 0.3}',
                          api_name="/generate")[0]
    before = _files(uploads)
    info = client.predict(png=gradio_client.handle_file(path), api_name="/png_info")
    assert _files(uploads) == before and not _holding(uploads, Path(path).read_bytes())  # read in memory, deleted
    assert not demo.upload_file_set
    assert info.pop("source") == "request" and info.pop("notes") == []
    assert info == dict(prompt="a red circle", negative_prompt="blue", model=MODEL, scheduler="ddim",
                        num_inference_steps=3, guidance_scale=4.0, seed=info["seed"], width=0, height=0,
                        guidance="rescale", guidance_params='{"guidance_rescale": 0.3}', num_images_per_prompt=1)
    again = client.predict(**info, api_name="/generate")[0]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(path)))

    text = client.predict(text=A1111, api_name="/png_info")
    assert text["source"] == "parameters" and text["scheduler"] == "dpmpp_2m_karras" and text["seed"] == 3141592653
    assert text["guidance_params"] == "{}" and (text["width"], text["height"]) == (512, 768)
    assert text["notes"] == ["ignored (no such setting here): Model hash, Lora hashes, Version"]


def test_api_refuses_what_is_not_a_png_with_settings_and_keeps_nothing(server, client, tmp_path):
    url, outputs, uploads, demo = server
    before_uploads, before_outputs = _files(uploads), _files(outputs)
    plain = tmp_path / "plain.png"
    plain.write_bytes(_png())  # a PNG without settings: it passes the gate, the handler refuses and deletes it
    with pytest.raises(gradio_client.exceptions.AppError, match="carries no generation settings"):
        client.predict(png=gradio_client.handle_file(str(plain)), api_name="/png_info")
    both = dict(png=gradio_client.handle_file(str(plain)), text=A1111)
    for kwargs, message in ((dict(text="a cat on a mat"), "not a parameters text: an AUTOMATIC1111 parameters text"),
                            (dict(), "give a PNG (saved by this playground or AUTOMATIC1111) or a parameters text"),
                            (both, "either a PNG or a parameters text")):
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            client.predict(api_name="/png_info", **kwargs)
        assert message in str(err.value)

    # The gate: a file that is not a PNG, or over 1 MB, is refused before Gradio writes a byte of it.
    text_file, big = b"settings? " * 100, PNG_SIGNATURE + os.urandom(MAX_PNG_BYTES)
    for name, data, status, detail in (
            ("notes.txt", text_file, 415, "this server takes only PNG images (PNG info); 'notes.txt' is not one"),
            ("fake.png", text_file, 415, "'fake.png' is not one"),
            ("big.png", big, 413, f"a file here is at most {MAX_PNG_BYTES} bytes; 'big.png' is {len(big)}"),
            ("huge.png", big * 2, 413, "an upload here is at most")):
        response = httpx.post(f"{url}gradio_api/upload", files={"files": (name, data, "image/png")})
        assert response.status_code == status and detail in response.json()["detail"], response.text
    assert httpx.post(f"{url}gradio_api/component_server", files={"files": ("a.png", _png())}).status_code == 403
    # A path the upload route did not write is neither read nor deleted (here: a run's own image).
    own = next(iter(outputs.glob("*/image.png")), None) or _our_png(outputs)[0]
    visitor = Visitor(url)
    answer = visitor.call("/png_info", png={"path": str(own), "meta": {"_type": "gradio.FileData"}})
    visitor.close()
    assert answer["success"] is False and "not uploaded to this page" in answer["output"]["error"] and own.is_file()
    assert _files(uploads) == before_uploads and not demo.upload_file_set
    assert {p for p in _files(outputs) if p != own} <= before_outputs  # no upload landed among the runs
    for data in (text_file, big, _png()):
        assert not _holding(uploads, data) and not _holding(outputs, data)


def test_stale_uploads_are_swept_and_only_uploads_are_deleted(tmp_path):
    """An upload no handler read (sent without its event) goes with the next PNG-info call once stale; a path that
    is not in Gradio's upload set is never touched."""
    fresh, stale, other = tmp_path / "a" / "fresh.png", tmp_path / "b" / "stale.png", tmp_path / "other.png"
    for p in (fresh, stale, other):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(_png())
    os.utime(stale, (1, 1))
    uploaded = {str(fresh), str(stale)}
    sweep_uploads(uploaded, older_than=60)
    assert fresh.is_file() and not stale.exists() and not stale.parent.exists() and uploaded == {str(fresh)}
    with pytest.raises(ValueError, match="not uploaded to this page"):
        take_upload({"path": str(other)}, uploaded)
    assert other.is_file()
    assert take_upload({"path": str(fresh)}, uploaded) == _png() and not fresh.exists() and not uploaded
    with pytest.raises(ValueError, match="not uploaded to this page, or was read already"):
        take_upload({"path": str(fresh)}, uploaded)


# -- the page, in Chromium -----------------------------------------------------------------------------------------


def _browser(playwright):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"])


def _open(browser, url: str, prompt: str, steps: int):
    """A desktop page on the app with `prompt` typed and `steps` set."""
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(url)
    page.wait_for_selector("#history")
    page.get_by_label("Prompt", exact=True).fill(prompt)
    _set_steps(page, steps)
    return page


def _set_steps(page, n: int) -> None:
    box = page.get_by_label("Steps").first
    box.fill(str(n))
    box.press("Enter")


def _done(page, seen: set[str]) -> str:
    """Wait until the status line says a run other than `seen` is done; its run id (added to `seen`)."""
    page.wait_for_function(
        """seen => { const s = document.querySelector('#live-status').innerText;
                     const m = s.match(/^Done.*Saved as run (\\S+?)\\.?$/s);
                     return m && !seen.includes(m[1]); }""", arg=sorted(seen), timeout=60000)
    run = page.locator("#live-status code").inner_text()
    seen.add(run)
    return run


def _generate_events(url: str) -> set[int]:
    """fn_index of the page's events that start a run: Generate's click and the prompt's submit (from /config)."""
    config = httpx.get(f"{url}config").json()
    ids = {c["id"] for c in config["components"]
           if c["props"].get("elem_id") == "generate-btn" or c["props"].get("label") == "Prompt"}
    return {i for i, d in enumerate(config["dependencies"]) if d.get("queue") is not False
            and d.get("trigger_after") is None
            and any(t[0] in ids and t[1] in ("click", "submit") for t in d["targets"])}


def test_browser_ctrl_enter_generates_once_and_reuse_seed(server):
    """Ctrl+Enter in the prompt and in the negative prompt starts exactly one run; Shift+Enter still does, Enter
    still adds a line; ♻ brings back the last run's seed and unticks Random seed; both say so on the page."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url = server[0]
    events = _generate_events(url)
    assert len(events) == 2, events
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = _open(browser, url, "keys run", 3)
        runs: list[int] = []  # the page's requests that start a run, as sent
        page.on("request", lambda r: "/queue/join" in r.url and r.post_data_json.get("fn_index") in events
                and runs.append(r.post_data_json["fn_index"]))
        page.evaluate("() => { window.clicks = 0; document.getElementById('generate-btn')"
                      ".addEventListener('click', () => window.clicks++); }")
        assert "Ctrl/Cmd+Enter" in page.get_by_label("Prompt", exact=True).get_attribute("placeholder")
        assert "Ctrl/Cmd+Enter" in page.locator("#generate-btn").get_attribute("title")
        assert "last run's seed" in page.locator("#reuse-seed").get_attribute("title")

        page.get_by_role("button", name="♻ reuse the last run's seed").click()  # nothing to reuse yet
        page.locator(".toast-body", has_text="No finished run in this tab yet").wait_for(timeout=10000)

        prompt = page.get_by_label("Prompt", exact=True)
        prompt.press("End")
        prompt.press("Enter")  # a new line, no run
        assert prompt.input_value() == "keys run\n"
        prompt.fill("keys run")
        seen: set[str] = set()
        prompt.press("Control+Enter")
        first = _done(page, seen)
        # A second request would have been sent at once (another event) or on the first's end (the same event).
        assert len(runs) == 1 and page.evaluate("window.clicks") == 1, (runs, page.evaluate("window.clicks"))
        seed = int(page.get_by_label("Seed", exact=True).input_value())
        assert f"seed {seed}" in page.locator("#live-status").inner_text()

        random_seed = page.get_by_label("Random seed")
        assert random_seed.is_checked()
        page.get_by_label("Seed", exact=True).fill("5")
        page.get_by_role("button", name="♻ reuse the last run's seed").click()
        page.wait_for_function("s => document.querySelector('#reuse-seed').closest('.row')"
                               ".querySelector('input[type=number]').value === s", arg=str(seed), timeout=10000)
        assert not random_seed.is_checked()

        page.get_by_label("Negative prompt").press("Control+Enter")
        second = _done(page, seen)
        assert len(runs) == 2 and page.evaluate("window.clicks") == 2
        assert f"seed {seed}" in page.locator("#live-status").inner_text()  # ♻'s seed, not a random one
        prompt.press("Shift+Enter")
        _done(page, seen)
        assert len(runs) == 3 and prompt.input_value() == "keys run"
        assert first != second and len(seen) == 3
        browser.close()


def test_browser_png_info_restores_a_dropped_png_and_a_pasted_text_and_refuses_the_rest(server, tmp_path):
    """A PNG made on the page, dropped back after the settings changed, restores them, and Generate then makes the
    same pixels; an A1111 parameters text pasted fills the controls; a file that is not a PNG with settings, or over
    1 MB, is refused with a line that says so and is kept nowhere (Gradio's upload folder, the outputs)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url, outputs, uploads, demo = server
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = _open(browser, url, "a red circle", 4)
        page.get_by_label("Negative prompt").fill("green")
        page.locator("#generate-btn").click()
        seen: set[str] = set()
        made = outputs / _done(page, seen) / "image.png"
        original = json.loads(made.parent.joinpath("trace.json").read_text())["seed"]

        # Other settings, then the PNG dropped back: they come back, and so do its pixels.
        page.get_by_label("Prompt", exact=True).fill("something else")
        page.get_by_label("Negative prompt").fill("")
        _set_steps(page, 2)
        page.get_by_label("Random seed").check()
        page.get_by_text("PNG info: settings from an image").click()
        data = made.read_bytes()
        before = _files(uploads)
        page.locator("#pnginfo-file input[type=file]").set_input_files(str(made))
        status = page.locator("#pnginfo-status")
        status.filter(has_text="Settings restored from the PNG's request chunk").wait_for(timeout=20000)
        assert page.get_by_label("Prompt", exact=True).input_value() == "a red circle"
        assert page.get_by_label("Negative prompt").input_value() == "green"
        assert page.get_by_label("Steps").first.input_value() == "4"
        assert page.get_by_label("Seed", exact=True).input_value() == str(original)
        assert not page.get_by_label("Random seed").is_checked()
        wait_until(lambda: _files(uploads) == before, 10, "the dropped PNG left Gradio's upload folder")
        assert not _holding(uploads, data) and not demo.upload_file_set
        page.locator("#generate-btn").click()
        again = outputs / _done(page, seen) / "image.png"
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
        page.screenshot(path=str(tmp_path / "restored.png"))

        # An A1111 parameters text pasted fills the controls.
        text = ("a small blue star\nNegative prompt: red\nSteps: 7, Sampler: Euler a, CFG scale: 4.5, Seed: 99, "
                "Size: 40x24, Model hash: 1234abcd, Model: tiny-sd")
        page.locator("#pnginfo-text textarea").fill(text)
        page.get_by_role("button", name="Apply parameters text").click()
        status.filter(has_text="Settings restored from the parameters text, seed 99").wait_for(timeout=20000)
        assert "ignored (no such setting here): Model hash" in status.inner_text()
        assert page.get_by_label("Prompt", exact=True).input_value() == "a small blue star"
        assert page.get_by_label("Negative prompt").input_value() == "red"
        assert page.get_by_label("Steps").first.input_value() == "7"
        assert page.get_by_label("Guidance scale").first.input_value() == "4.5"
        assert page.get_by_label("Seed", exact=True).input_value() == "99"
        assert page.get_by_label("Width").first.input_value() == "40"
        assert page.get_by_label("Height").first.input_value() == "24"
        assert page.get_by_label("Scheduler").input_value().startswith("euler_a")
        page.locator("#pnginfo-text textarea").fill("just some words")
        page.get_by_role("button", name="Apply parameters text").click()
        status.filter(has_text="Not restored: not a parameters text").wait_for(timeout=20000)
        assert page.get_by_label("Prompt", exact=True).input_value() == "a small blue star"  # left as it was

        # Refused: not a PNG (by name, then by content), over 1 MB, a PNG without settings.
        before_outputs = _files(outputs)
        files = {"notes.txt": b"Steps: 20, Sampler: Euler a, CFG scale: 7",
                 "fake.png": b"Steps: 20, Sampler: Euler a, CFG scale: 7",
                 "big.png": PNG_SIGNATURE + os.urandom(MAX_PNG_BYTES), "plain.png": _png()}
        said = {"notes.txt": "Invalid file type: notes.txt. Only .png allowed.",
                "fake.png": "this server takes only PNG images (PNG info); 'fake.png' is not one",
                "big.png": 'exceed the maximum allowed size of 1.0 Mb: "big.png"',
                "plain.png": "this PNG carries no generation settings"}
        for name, content in files.items():
            path = tmp_path / name
            path.write_bytes(content)
            page.locator("#pnginfo-file input[type=file]").set_input_files(str(path))
            page.locator(".toast-body", has_text=said[name]).first.wait_for(timeout=20000)
        status.filter(has_text="Not restored: this PNG carries no generation settings").wait_for(timeout=10000)
        wait_until(lambda: _files(uploads) == before, 10, "refused files left Gradio's upload folder")
        assert _files(outputs) == before_outputs
        for content in files.values():
            assert not _holding(uploads, content) and not _holding(outputs, content)
        assert page.get_by_label("Prompt", exact=True).input_value() == "a small blue star"
        browser.close()
