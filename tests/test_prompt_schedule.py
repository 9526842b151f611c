"""Prompt schedules (AUTOMATIC1111's [from:to:when] prompt editing): the parser against A1111's own examples, the
request and its errors, the prompt notes, the loop against the stock pipelines with a callback that swaps the text
embeddings, the copied diffusers script, PNG metadata, the embedded model's judge, the layout experiment and CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import explain
from pipelines.__main__ import main
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.outputs import save_image
from pipelines.pnginfo import read_png_info
from pipelines.prompts import SCHEDULE_FORMS, PromptSchedule, Segment, prompt_notes, schedule_segments, switch_at
from pipelines.requests import build_request, missing_embedded
from pipelines.types import DEFAULT_MODEL, GenerationRequest
from shapes.judge import Judge
from tests.tiny import TINY_SIZE, tiny_pipeline
from ui.render import diffusers_code, diffusers_script

EMBEDDED = pytest.mark.skipif(missing_embedded(DEFAULT_MODEL) is not None, reason="embedded model not installed")
SHAPES = "a large red [circle:triangle:{}] in the center"


def texts(prompt: str, steps: int) -> list[tuple[int, int | None, str]]:
    return [(s.first, s.last, s.text) for s in schedule_segments(prompt, steps)]


# ---- the parser ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,expected", [
    # A1111's doctests (modules/prompt_parser.py, 10 steps): [[end_at_step, text], ...] -> (first, last, text)
    ("test", [(0, None, "test")]),
    ("a [b:3]", [(0, 3, "a "), (4, None, "a b")]),
    ("a [b: 3]", [(0, 3, "a "), (4, None, "a b")]),
    ("[(a:2):3]", [(0, 3, ""), (4, None, "(a:2)")]),
    ("a [b : c : 1] d", [(0, 1, "a b  d"), (2, None, "a  c  d")]),
    ("a [b:.5] c", [(0, 5, "a  c"), (6, None, "a b c")]),
    # [from::when] removes, [to:when] adds, several schedules interleave
    ("a [x::2] [y:4]", [(0, 2, "a x "), (3, 4, "a  "), (5, None, "a  y")]),
    # when 0 reads `to` from the start; when = steps reads `from` throughout (A1111 1.6+)
    ("a [b:c:0] d", [(0, None, "a c d")]),
    ("a [b:c:0.0] d", [(0, None, "a c d")]),
    ("a [b:c:10] d", [(0, None, "a b d")]),
    # [word] (A1111's de-emphasis, not applied here) is read as typed; \[ \] are literal brackets
    ("a [red] [b:c:5]", [(0, 5, "a [red] b"), (6, None, "a [red] c")]),
    (r"a \[x\] [b:c:5]", [(0, 5, "a [x] b"), (6, None, "a [x] c")]),
])
def test_segments_follow_a1111(prompt, expected):
    assert texts(prompt, 10) == expected


def test_fractions_and_step_numbers_count_as_a1111_does():
    """when < 1 is int(when * steps) (the float product, truncated); `from` is read on iterations 0..w, one more
    than w: A1111's [a:b:5] reads b from the 7th step (issue #7279), its 0.1 of 20 steps from the 4th."""
    assert texts(SHAPES.format("0.1"), 20) == [(0, 2, "a large red circle in the center"),
                                                (3, None, "a large red triangle in the center")]
    assert texts("[a:b:5]", 20) == [(0, 5, "a"), (6, None, "b")]
    assert texts("[a:b:0.29]", 100)[0][1] == 28  # 0.29 * 100 = 28.999999999999996
    assert texts("[a:b:1]", 20) == [(0, 1, "a"), (2, None, "b")]
    assert texts("[a:b:0.04]", 20) == [(0, None, "b")]  # int(0.8) = 0: `to` from the start


def test_iterations_past_the_steps_keep_the_last_text():
    """Heun's 2N-1 and PLMS's N+1 loop iterations read the same schedule (A1111 counts model calls too)."""
    schedule = PromptSchedule.parse("[a:b:3]", "", 4)
    assert [schedule.pairs[schedule.pair_index(i)][0] for i in range(7)] == ["a"] * 4 + ["b"] * 3


def test_negative_prompt_schedule_and_pairs():
    schedule = PromptSchedule.parse(SHAPES.format("0.1"), "blurry [ugly::0.5]", 20)
    assert schedule.negative_prompt == (Segment(0, 10, "blurry ugly"), Segment(11, None, "blurry "))
    assert schedule.pairs == (("a large red circle in the center", "blurry ugly"),
                              ("a large red triangle in the center", "blurry ugly"),
                              ("a large red triangle in the center", "blurry "))
    assert schedule.starts == ((0, 0), (3, 1), (11, 2))
    assert [schedule.pair_index(i) for i in (0, 2, 3, 10, 11, 19)] == [0, 0, 1, 1, 2, 2]
    assert schedule.scheduled
    plain = PromptSchedule.parse("a red circle", "blue", 20)
    assert plain.pairs == (("a red circle", "blue"),) and not plain.scheduled
    # A text that comes back later is encoded once.
    back = PromptSchedule.parse("[a::3][:a:6]", "", 10)
    assert back.pairs == (("a", ""), ("", "")) and back.starts == ((0, 0), (4, 1), (7, 0))


@pytest.mark.parametrize("prompt,message", [
    ("a [b", "the '[' at character 3 is never closed"),
    ("a ] b", "']' at character 3 closes no '['"),
    ("a [[b]:c:2]", "nested brackets are not supported"),
    ("[a|b]", "alternation [a|b] is not supported"),
    ("[a:b:c:2]", "too many ':'"),
    ("[cat:dog]", "'dog' is not a number"),
    ("[a:b:-1]", "when '-1' is negative"),
    ("[a:b:1.5]", "when '1.5' has a decimal point but is not below 1"),
    ("[a:b:1.0]", "when '1.0' has a decimal point but is not below 1"),
    ("[a:b:21]", "when '21' is past the run's 20 steps"),
    ("[a:b:1e-1]", "'1e-1' is not a number"),
])
def test_malformed_schedules_say_what_is_allowed(prompt, message):
    with pytest.raises(ValueError) as e:
        schedule_segments(prompt, 20)
    assert message in str(e.value)
    assert SCHEDULE_FORMS in str(e.value) or "whole step number from 0 to 20" in str(e.value) or "nested" in message


def test_the_negative_prompt_is_named_in_its_errors():
    with pytest.raises(ValueError, match=r"^negative_prompt: \[a:b:30\] at character 1: when '30' is past"):
        PromptSchedule.parse("a red circle", "[a:b:30]", 20)


def test_switch_at_rewrites_the_one_when():
    assert switch_at("a large red [circle:triangle:WHEN] in the center", "0.25") == SHAPES.format("0.25")
    assert switch_at(r"\[x\] [red:2] circle", "7") == r"\[x\] [red:7] circle"
    for prompt in ("a red circle", "[a:b:1] [c:d:2]", "[red] circle"):
        with pytest.raises(ValueError, match="exactly one prompt schedule"):
            switch_at(prompt, "0.5")


# ---- the request, its builder and the notes -------------------------------------------------------------------------


def test_the_request_keeps_the_prompt_as_typed_and_parses_it_against_its_steps():
    request = GenerationRequest(prompt=SHAPES.format("0.1"), negative_prompt="[blurry:5]", num_inference_steps=20)
    assert request.prompt == SHAPES.format("0.1") and request.schedule.scheduled
    data = request.to_dict()
    assert data["prompt"] == SHAPES.format("0.1") and "schedule" not in data
    assert GenerationRequest(**data).schedule == request.schedule
    fewer = dataclasses.replace(request, num_inference_steps=10)  # the same fraction, read against 10 steps
    assert fewer.schedule.prompt[0].last == 1
    with pytest.raises(ValueError, match="negative_prompt: .*when '5' is past the run's 4 steps"):
        dataclasses.replace(request, num_inference_steps=4)


def test_build_request_refuses_a_malformed_schedule(tiny_loader):
    with pytest.raises(ValueError, match=r"prompt: the '\[' at character 13 is never closed"):
        build_request(prompt="a large red [circle in the center", model="sd", loader=tiny_loader,
                      num_inference_steps=4, guidance_scale=3)
    request = build_request(prompt=SHAPES.format("0.5"), model="sd", loader=tiny_loader, num_inference_steps=4,
                            guidance_scale=3)
    assert request.schedule.pairs[1][0] == "a large red triangle in the center"


def test_prompt_notes_show_the_schedule(tiny_loader):
    pipe = tiny_loader.get("sd")
    notes = prompt_notes(pipe, SHAPES.format("0.1"), "blurry [ugly::0.5]", steps=20)
    assert notes == ["Prompt schedule: steps 1–3: 'a large red circle in the center'; "
                     "steps 4–20: 'a large red triangle in the center'",
                     "Negative prompt schedule: steps 1–11: 'blurry ugly'; steps 12–20: 'blurry'"]
    # A switch after the last step never comes: one text, no schedule to show.
    assert prompt_notes(pipe, "[a:b:19]", steps=20) == []
    assert prompt_notes(pipe, "a [b:c:1.5]", steps=20) == [
        "prompt: [b:c:1.5] at character 3: when '1.5' has a decimal point but is not below 1; when is a fraction "
        "of the steps below 1 (such as 0.1) or a whole step number from 0 to 20"]
    assert "is read as typed" in prompt_notes(pipe, "a [red] circle", steps=20)[0]
    assert prompt_notes(pipe, r"a \[red\] circle", steps=20) == []


def test_notes_check_each_text_the_encoder_reads(embedded_loader):
    pipe = embedded_loader.get(DEFAULT_MODEL)
    from pipelines.registry import model_vocabulary

    vocabulary = model_vocabulary(DEFAULT_MODEL)
    # Every word of both texts is in the vocabulary, and neither text passes 75 tokens: nothing but the schedule.
    assert prompt_notes(pipe, SHAPES.format("0.5"), vocabulary=vocabulary, steps=20) == [
        "Prompt schedule: steps 1–11: 'a large red circle in the center'; "
        "steps 12–20: 'a large red triangle in the center'"]
    long_tail = "[" + "red " * 80 + "circle::0.5] blue star"
    assert prompt_notes(pipe, long_tail, steps=20)[1] == (
        "Prompt (steps 1–11) is 83 tokens; the text encoder reads only the first 75 — ignored: "
        "'red red red red red circle blue star'")
    assert prompt_notes(pipe, "[circle::0]", steps=20)[-1].startswith("Empty prompt")


# ---- the loop against the stock pipelines ----------------------------------------------------------------------------


def _switch_callback(pipe, family: str, texts: dict[int, tuple[str, str | None]], images: int):
    """A stock callback_on_step_end that hands the loop the embeddings of the texts from step i + 1 (written here
    from the pipelines' encode_prompt, independently of ui/render.py)."""
    def callback(p, i, t, tensors):
        if i + 1 not in texts:
            return {}
        prompt, negative = texts[i + 1]
        cfg = p.do_classifier_free_guidance
        if family == "sd":
            cond, uncond = p.encode_prompt(prompt, p.device, images, cfg, negative)
            return {"prompt_embeds": torch.cat([uncond, cond]) if cfg else cond}
        kwargs = dict(device=p.device, num_images_per_prompt=images, do_classifier_free_guidance=cfg,
                      negative_prompt=negative)
        if family == "sd3":
            kwargs |= dict(prompt_2=None, prompt_3=None, max_sequence_length=256)
        cond, uncond, pooled, uncond_pooled = p.encode_prompt(prompt=prompt, **kwargs)
        pooled_name = "add_text_embeds" if family == "sdxl" else "pooled_prompt_embeds"
        return {"prompt_embeds": torch.cat([uncond, cond]) if cfg else cond,
                pooled_name: torch.cat([uncond_pooled, pooled]) if cfg else pooled}
    return callback


@pytest.fixture(scope="module")
def stock():
    return {family: tiny_pipeline(family) for family in ("sd", "sdxl", "sd3")}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
@pytest.mark.parametrize("scale,images", [(5.0, 1), (1.0, 1), (5.0, 2)])
def test_the_loop_equals_the_stock_pipeline_with_a_callback_swap(tiny_loader, stock, family, scale, images):
    size = TINY_SIZE[family]
    request = GenerationRequest(prompt="a red [circle:star:1] on [blue:green:0.5]", negative_prompt="[white::2]",
                                model=family, num_inference_steps=5, guidance_scale=scale, seed=4, width=size,
                                height=size, num_images_per_prompt=images,
                                scheduler="euler" if family != "sd3" else None)
    ours = generate(request, loader=tiny_loader)
    schedule = request.schedule
    assert schedule.starts == ((0, 0), (2, 1), (3, 2))  # switches at iteration 2 (prompt), 3 (prompt and negative)
    pipe = stock[family]
    if family != "sd3":
        pipe.scheduler = type(tiny_loader.view(family, "euler")[0].scheduler).from_config(pipe.scheduler.config)
    first = schedule.pairs[0]
    texts = {start: (schedule.pairs[k][0], schedule.pairs[k][1] or None) for start, k in schedule.starts[1:]}
    names = ["prompt_embeds"] + {"sd": [], "sdxl": ["add_text_embeds"], "sd3": ["pooled_prompt_embeds"]}[family]
    generators = [torch.Generator("cpu").manual_seed(4 + i) for i in range(images)]
    out = pipe(prompt=first[0], negative_prompt=first[1] or None, num_inference_steps=5, guidance_scale=scale,
               width=size, height=size, num_images_per_prompt=images,
               generator=generators[0] if images == 1 else generators, output_type="latent",
               callback_on_step_end=_switch_callback(pipe, family, texts, images),
               callback_on_step_end_tensor_inputs=names)
    torch.testing.assert_close(ours.latents, out.images, rtol=1e-5, atol=1e-5)
    unswitched = generate(dataclasses.replace(request, prompt="a red circle on blue", negative_prompt="white"),
                          loader=tiny_loader)
    assert not torch.allclose(unswitched.latents, ours.latents, atol=1e-4), "the switch must change the result"


@pytest.mark.parametrize("family", ["sd", "sd_v", "sdxl", "pixart_sigma", "sd3"])
def test_every_family_switches_at_the_step(tiny_loader, family):
    """The run reads `from` up to the switch and `to` after it: its steps equal the `from` run's until the switch,
    the `to` text's from the switch on (PixArt-Σ's stock pipeline has no callback_on_step_end to compare with)."""
    size = TINY_SIZE[family]
    base = GenerationRequest(prompt="a [red:blue:2] circle", model=family, num_inference_steps=5, guidance_scale=4.0,
                             seed=2, width=size, height=size)
    seen = {}
    for name, prompt in (("switched", base.prompt), ("from", "a red circle"), ("to", "a blue circle")):
        observer = CollectingObserver()
        result = generate(dataclasses.replace(base, prompt=prompt), observer, loader=tiny_loader)
        seen[name] = [e.latents for e in observer.events] + [result.latents]
    for i in range(3):  # iterations 0..2 read "a red circle"
        torch.testing.assert_close(seen["switched"][i], seen["from"][i], rtol=0, atol=0)
    assert not torch.allclose(seen["switched"][3], seen["from"][3], atol=1e-5)
    assert not torch.allclose(seen["switched"][-1], seen["to"][-1], atol=1e-5)
    # when 0 and when = steps are the plain runs, exactly
    for when, plain in (("0", "to"), ("5", "from")):
        result = generate(dataclasses.replace(base, prompt=f"a [red:blue:{when}] circle"), loader=tiny_loader)
        torch.testing.assert_close(result.latents, seen[plain][-1], rtol=0, atol=0)


# ---- the copied diffusers code, PNG metadata ------------------------------------------------------------------------


@pytest.mark.parametrize("family,scheduler", [("sd", "dpmpp_2m"), ("sdxl", "euler")])
def test_the_copied_code_reproduces_a_switched_run(tmp_path, monkeypatch, family, scheduler):
    folder = tmp_path / f"tiny-{family}"
    tiny_pipeline(family).save_pretrained(folder)
    loader = ModelLoader(device="cpu")
    request = GenerationRequest(prompt="a red [circle:star:0.4] on blue", negative_prompt="[green::3]",
                                model=str(folder), scheduler=scheduler, num_inference_steps=6, guidance_scale=5.0,
                                seed=9, width=32, height=32)
    result = generate(request, loader=loader)
    code = diffusers_code(result, torch.float32, "cpu")
    assert "callback_on_step_end=switch_prompt" in code and repr(request.prompt) in code
    assert "prompt='a red circle on blue'" in code  # the stock call starts with the first texts
    monkeypatch.chdir(tmp_path)  # the script names a model folder outside the repository by its name
    exec(compile(code, "diffusers_code", "exec"), {})
    ours = np.asarray(result.image, dtype=np.int16)
    stock_image = np.asarray(Image.open(tmp_path / "image.png"), dtype=np.int16)
    assert np.abs(ours - stock_image).max() <= 1
    # The tiny VAE hides most of what text changes (a level or two), so the switch itself is checked on the latents:
    # the same script asked for latents, with its callback and without it.
    latent_code = code.replace('    callback_on_step_end=switch_prompt,\n',
                               '    output_type="latent",\n    callback_on_step_end=switch_prompt,\n')
    latent_code = latent_code.replace('image.save("image.png")', "")
    switched, unswitched = {}, {}
    exec(compile(latent_code, "diffusers_code", "exec"), switched)
    torch.testing.assert_close(switched["image"], result.latents[0], rtol=1e-5, atol=1e-5)
    exec(compile(latent_code.replace("    callback_on_step_end=switch_prompt,\n", ""), "diffusers_code", "exec"),
         unswitched)
    assert not torch.allclose(unswitched["image"], result.latents[0], atol=1e-3), "the callback must change the run"


def test_the_copied_code_says_when_a_stock_pipeline_cannot_switch():
    request = GenerationRequest(prompt=SHAPES.format("0.5"), model="pixart_sigma", num_inference_steps=4, seed=1)
    code = diffusers_script(request, seed=1, width=32, height=32, scheduler="ddim", family="pixart_sigma",
                            stopped_at=None, dtype=torch.float32, device="cpu")
    assert "lets no callback swap the text embeddings" in code and "switch_prompt" not in code
    pag = dataclasses.replace(request, model="sd3", guidance="pag")
    code = diffusers_script(pag, seed=1, width=32, height=32, scheduler="flow_euler", family="sd3",
                            stopped_at=None, dtype=torch.float32, device="cpu")
    assert "StableDiffusion3PAGPipeline lets no callback" in code  # pooled_prompt_embeds is not among its inputs
    plain = dataclasses.replace(request, prompt="a red circle", model="sd")
    code = diffusers_script(plain, seed=1, width=32, height=32, scheduler="ddim", family="sd", stopped_at=None,
                            dtype=torch.float32, device="cpu")
    assert "callback" not in code and "prompt='a red circle'" in code


def test_png_metadata_keeps_the_prompt_as_typed(tiny_loader, tmp_path):
    request = GenerationRequest(prompt=SHAPES.format("0.1"), negative_prompt="[blurry::0.5]", model="sd",
                                num_inference_steps=4, guidance_scale=3.0, seed=5, width=32, height=32)
    result = generate(request, loader=tiny_loader)
    path = save_image(tmp_path / "image.png", result)
    text = Image.open(path).text
    assert text["parameters"].startswith(SHAPES.format("0.1") + "\nNegative prompt: [blurry::0.5]\n")
    assert json.loads(text["request"])["prompt"] == SHAPES.format("0.1")
    info = read_png_info(path.read_bytes())
    assert info["prompt"] == SHAPES.format("0.1") and info["negative_prompt"] == "[blurry::0.5]"
    again = generate(GenerationRequest(**{k: info[k] for k in ("prompt", "negative_prompt", "num_inference_steps",
                                                               "guidance_scale", "seed")},
                                       model="sd", width=32, height=32), loader=tiny_loader)
    torch.testing.assert_close(again.latents, result.latents, rtol=0, atol=0)
    # A1111's own parameters text (no request chunk) reads the same way.
    assert read_png_info_text(text["parameters"])["prompt"] == SHAPES.format("0.1")


def read_png_info_text(parameters: str) -> dict:
    from pipelines.pnginfo import parse_parameters

    return parse_parameters(parameters)


# ---- the embedded model: the judge, the layout experiment, the CLI --------------------------------------------------


@pytest.fixture(scope="module")
def embedded_loader():
    if missing_embedded(DEFAULT_MODEL) is not None:
        pytest.skip("embedded model not installed")
    return ModelLoader(device="cpu")


@EMBEDDED
def test_an_early_switch_draws_the_new_shape_and_a_last_step_switch_keeps_the_old(embedded_loader):
    """'a large red [circle:triangle:when] in the center', seeds 0-5, the model's own 20 steps of DPM++ 2M at CFG 3.

    Measured: at 10 % (triangle from step 4) 6 of 6 triangles; at 90 % (triangle for the last step only) 6 of 6
    circles. The issue's 85 % (triangle for the last two steps, 19 and 20) draws a circle on only 2 of these 6 seeds
    (5 of 6 with Euler or DDIM, 1 of 6 with UniPC): on this model the outline is drawn in the last steps, after the
    position, size and colour (see the layout experiment)."""
    judge = Judge()
    shapes = {}
    for when in ("0.1", "0.9"):
        requests = [build_request(prompt=SHAPES.format(when), model=DEFAULT_MODEL, loader=embedded_loader, seed=s)
                    for s in range(6)]
        shapes[when] = [judge(generate(r, loader=embedded_loader).image).shape for r in requests]
    assert shapes["0.1"].count("triangle") >= 4, shapes
    assert shapes["0.9"].count("circle") >= 4, shapes


@EMBEDDED
def test_the_layout_experiment_reads_each_switch_with_the_judge(embedded_loader, tmp_path):
    request = build_request(prompt=SHAPES.format("0.5"), model=DEFAULT_MODEL, loader=embedded_loader, seed=0)
    reports = list(explain.layout(request, (0.1, 1.0), 1, loader=embedded_loader))
    report = reports[-1]
    assert [len(r.cells) for r in reports] == [1, 2] and report.done and not reports[0].done
    assert report.changes == {"shape": ("circle", "triangle")}
    assert report.before == "a large red circle in the center" and report.after == "a large red triangle in the center"
    assert report.switch_steps == (4, None)
    assert [c.prompt for c in report.cells] == [SHAPES.format("0.1"), SHAPES.format("20")]
    assert [c.reads for c in report.cells] == ["to", "from"]
    assert report.counts() == [{"from": 0, "to": 1, "neither": 0}, {"from": 1, "to": 0, "neither": 0}]
    assert "decided during steps 4 to 20 of 20" in report.words()
    data = report.write(tmp_path)
    assert (tmp_path / "layout.png").is_file() and json.loads((tmp_path / "layout.json").read_text()) == data
    cell = Image.open(tmp_path / data["cells"][0]["image"])
    assert json.loads(cell.text["request"])["prompt"] == SHAPES.format("0.1")
    assert data["cells"][1]["judge"]["shape"] == "circle"


@EMBEDDED
def test_the_layout_experiment_refuses_what_it_cannot_read(embedded_loader):
    request = build_request(prompt="a large red circle in the center", model=DEFAULT_MODEL, loader=embedded_loader,
                            seed=0)
    with pytest.raises(ValueError, match="exactly one prompt schedule"):
        explain.finish(explain.layout(request, loader=embedded_loader))
    same = dataclasses.replace(request, prompt="a large [red:red:0.5] circle")
    with pytest.raises(ValueError, match="must change what the judge reads"):
        explain.finish(explain.layout(same, loader=embedded_loader))
    with pytest.raises(ValueError, match="fractions of the steps from 0 to 1"):
        explain.parse_points("0,1.5")
    with pytest.raises(ValueError, match="only score the embedded model"):
        explain.finish(explain.layout(dataclasses.replace(request, model="sd"), loader=embedded_loader))


@EMBEDDED
def test_cli_generate_and_layout(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a large red [circle:triangle:0.1] in the center", "--seed", "1",
                 "--out", str(out)]) == 0
    assert Image.open(out / "image.png").text["parameters"].startswith(SHAPES.format("0.1") + "\n")
    assert main(["layout", "--prompt", SHAPES.format("WHEN"), "--switch-at", "0,1", "--seed", "2",
                 "--out", str(tmp_path / "layout")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "layout.png" in line and "0: 1 to, 1: 1 from" in line
    data = json.loads((tmp_path / "layout" / "layout.json").read_text())
    assert data["fractions"] == [0.0, 1.0] and data["switch_steps"] == [1, None] and data["seeds"] == [2]
    assert main(["generate", "--prompt", "a [circle:triangle:1.5]", "--out", str(tmp_path / "bad")]) == 2
    assert "has a decimal point but is not below 1" in capsys.readouterr().err


# ---- the app: the prompt note, the layout tab and its endpoint -------------------------------------------------------


@pytest.fixture(scope="module")
def app_server(tmp_path_factory, embedded_loader):
    """The real app around the embedded model on a free port (tests/serving.py)."""
    from tests.serving import serve

    with serve(embedded_loader, tmp_path_factory.mktemp("outputs"), models=[DEFAULT_MODEL]) as (url, demo):
        yield url


@EMBEDDED
def test_the_layout_endpoint_runs_the_switch_points(app_server):
    gradio_client = pytest.importorskip("gradio_client")
    from gradio_client.exceptions import AppError

    client = gradio_client.Client(app_server, verbose=False)
    main_settings = dict(prompt="a small blue star", seed=3, randomize_seed=False, num_inference_steps=10)
    status, gallery, words, _, numbers = client.predict(**main_settings, layout_prompt=SHAPES.format("WHEN"),
                                                        layout_at="0.1,1", layout_seeds=1, api_name="/explain_layout")
    assert status.startswith("Done: 2 / 2 runs, seed 3") and "shape: circle → triangle" in status
    assert numbers["experiment"] == "layout" and numbers["switch_steps"] == [3, None]
    assert [c["prompt"] for c in numbers["cells"]] == [SHAPES.format("0.1"), SHAPES.format("10")]
    gallery = gallery["value"] if isinstance(gallery, dict) else gallery
    assert [g["caption"].split(" · ")[0] for g in gallery] == ["10%: from step 3", "100%: never"]
    assert words == numbers["words"] and "decided during" in words
    with pytest.raises(AppError, match="exactly one prompt schedule"):
        client.predict(**main_settings, layout_prompt="a large red circle", layout_at="0,1", layout_seeds=1,
                       api_name="/explain_layout")
    with pytest.raises(AppError, match="fractions of the steps from 0 to 1"):
        client.predict(**main_settings, layout_prompt=SHAPES.format("WHEN"), layout_at="0,2", layout_seeds=1,
                       api_name="/explain_layout")


@EMBEDDED
def test_browser_the_prompt_note_shows_the_schedule_for_the_steps_set(app_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.test_app import _browser, _set_steps

    note = "() => document.querySelector('#prompt-note').innerText"
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_server)
        page.wait_for_selector("#history")
        page.get_by_label("Prompt", exact=True).fill(SHAPES.format("0.1"))
        _set_steps(page, 20)
        page.wait_for_function(f"() => ({note})().includes('steps 4–20')", timeout=30000)
        assert page.evaluate(note).strip() == ("ℹ️ Prompt schedule: steps 1–3: 'a large red circle in the center'; "
                                               "steps 4–20: 'a large red triangle in the center'")
        _set_steps(page, 10)  # int(0.1 × 10) = 1: the circle for steps 1-2
        page.wait_for_function(f"() => ({note})().includes('steps 3–10')", timeout=30000)
        page.get_by_label("Prompt", exact=True).fill("a large red [circle:triangle:0.1 in the center")
        page.wait_for_function(f"() => ({note})().includes('is never closed')", timeout=30000)
        browser.close()
