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

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.outputs import a1111_parameters, save_image, save_png
from pipelines.pnginfo import (MAX_PNG_BYTES, PNG_SIGNATURE, parse_parameters, png_text, read_png_info,
                               scheduler_for)
from pipelines.types import GenerationRequest
from tests.serving import serve, wait_until
from tests.tiny import tiny_pipeline

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
    assert "ignored (no such setting here): Denoising strength, Hires upscale, Clip skip, Stopped at step" in info["notes"]
    assert any("stopped at step 5" in n for n in info["notes"])


def test_our_guidance_fields_and_a1111_cfg_rescale():
    ours = parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 32x32, "
                            "Guidance: interval sigma_hi=3 sigma_lo=0.5")
    assert ours["guidance"] == "interval" and ours["guidance_params"] == {"sigma_hi": 3.0, "sigma_lo": 0.5}
    phi = parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, CFG Rescale phi: 0.7")
    assert phi["guidance"] == "rescale" and phi["guidance_params"] == {"guidance_rescale": 0.7}
    assert parse_parameters("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Batch size: 4")["num_images_per_prompt"] == 4


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
