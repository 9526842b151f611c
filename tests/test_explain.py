"""The Explain lab's experiments on the embedded model (tiny-shapes, 64×64), with fixed seeds: the trends the lab
shows a user are the trends this model really has. Few steps and few branches keep it fast."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import explain
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.requests import build_request, missing_embedded
from pipelines.types import DEFAULT_MODEL, GenerationRequest

pytestmark = pytest.mark.skipif(missing_embedded(DEFAULT_MODEL) is not None, reason="embedded model not installed")

PROMPTS = [("a large red circle in the center", 1), ("a small blue star in the top left", 3),
           ("a yellow heart at the bottom", 7)]


@pytest.fixture(scope="module")
def loader() -> ModelLoader:
    return ModelLoader(device="cpu")


def request(loader, prompt="a large red circle in the center", seed=1, **kw) -> GenerationRequest:
    return build_request(prompt=prompt, model=DEFAULT_MODEL, loader=loader, seed=seed, **kw)


@pytest.fixture(scope="module")
def jumps(loader):
    """Jump vs walk at the model's recommended 20 steps (its own DPM++ 2M, CFG 3), one 5-step short run each."""
    return [explain.finish(explain.jump(request(loader, p, s), loader=loader, short_steps=[5])) for p, s in PROMPTS]


def test_jump_distance_to_final_falls_over_the_steps(jumps):
    """x̂0 ends at the final image and gets there steadily over the second half. Early on it may lean toward a
    background the prompt leaves open and then give it up (red circle, seed 1: RMS 0.19 at step 2, 0.23 at step 4,
    0.12 at step 7), so the first half is only asked to end closer than it began."""
    for report in jumps:
        d = [s.distance_to_final for s in report.steps]
        assert len(d) == 20 and d[-1] < 1e-3  # the last x̂0 is the final image (up to uint8 rounding)
        assert d[0] > d[10] > d[15] > d[-1], d
        assert all(b <= a + 0.005 for a, b in zip(d[10:], d[11:])), d  # monotone up to a rounding-sized wobble


def test_jump_x0_starts_as_the_blurriest_and_ends_sharp(jumps):
    """x̂0 goes from the blurry average to the final image: step 1's is the least sharp of the run and the final one
    sharper (on v1 this was an xfail: its epsilon-predicted first x̂0 was speckle, mean squared Laplacian x1e3 at
    steps 1/10/20 0.67/0.90/0.67 for the red circle). Final over first, step 10,426 weights: red circle 2.7x, blue
    star 4.8x, yellow heart 1.8x (a heart of unstated size: its first x̂0 already holds a soft heart). Between them
    the sharpness is not monotone: mid-run x̂0 overshoots with edge halos before it settles (red circle: 0.09 at
    step 1, 0.72 at step 4, 0.24 at the end, x1e3)."""
    for report in jumps:
        s = [x.sharpness for x in report.steps]
        assert s[0] == min(s) and s[-1] > 1.5 * s[0], s


def test_a_k_step_run_is_not_step_k_of_a_long_run(jumps):
    for report in jumps:
        (short,) = report.short_runs
        assert short.steps == 5
        assert short.distance_to_jump > 0.01  # not x̂0 after 5 of 20 steps
        assert short.distance_to_final > 0.0  # nor the 20-step image


def test_a_one_step_run_is_exactly_the_first_jump(loader):
    """The first step's x̂0 is what a 1-step run returns: same noise, same σ_max, one model call."""
    req = request(loader, "a small blue star in the top left", 3, num_inference_steps=8)
    report = explain.finish(explain.jump(req, loader=loader, short_steps=[1]))
    assert report.short_runs[0].distance_to_jump < 0.005


@pytest.fixture(scope="module")
def thin_jump(loader, jumps):
    """jumps[0]'s request again with room for 4 of its x̂0 images (max_image_bytes)."""
    size = jumps[0].steps[0].image.nbytes
    return explain.finish(explain.jump(request(loader, *PROMPTS[0]), loader=loader, short_steps=[5],
                                       max_image_bytes=4 * size))


def test_an_image_budget_thins_the_x0_images_and_keeps_every_number(loader, jumps, thin_jump):
    """Past max_image_bytes a jump keeps evenly spaced steps' images (first, last and the k-step runs' included);
    every step keeps its numbers, and the thinned report measures exactly what the full one does."""
    full = jumps[0]
    size = full.steps[0].image.nbytes
    thin = thin_jump
    kept = [s.step for s in thin.steps if s.image is not None]
    assert kept == sorted(set(explain.frame_steps(20, 4)) | {4}) and kept[0] == 0 and kept[-1] == 19, kept
    for a, b in zip(full.steps, thin.steps):
        assert (a.step, a.distance_to_final, a.sharpness) == (b.step, b.distance_to_final, b.sharpness)
        assert b.image is None or np.array_equal(a.image, b.image)
    assert thin.short_runs[0].distance_to_jump == full.short_runs[0].distance_to_jump
    assert thin.image_near(4).step == 4 and thin.image_near(8).step == 6 and thin.image_near(19).step == 19
    assert full.image_near(8).step == 8  # unbounded: every step has its image
    assert explain.finish(explain.jump(request(loader, *PROMPTS[0]), loader=loader, short_steps=[5],
                                       max_image_bytes=20 * size)).image_near(8).step == 8  # all fit: all kept

    req = request(loader, "a large green triangle on the right", 5, num_inference_steps=12)
    dissected = explain.finish(explain.dissect(req, loader=loader, max_image_bytes=3 * 3 * size))
    kept = [s.step for s in dissected.steps if s.x0 is not None]
    assert kept == explain.frame_steps(12, 3) == [0, 6, 11]
    assert all((s.x0_cond is not None) == (s.step in kept) for s in dissected.steps)
    assert all(s.guidance_delta_norm is not None for s in dissected.steps)  # the numbers of every step
    assert dissected.images_near(2).step == 0 and dissected.images_near(4).step == 6


def test_branch_shares_the_trunk_before_its_step_and_leaves_it_after(loader):
    base = request(loader, scheduler="euler_a", num_inference_steps=8)
    trunk, branched = CollectingObserver(), CollectingObserver()
    generate(base, trunk, loader=loader)
    generate(dataclasses.replace(base, branch=(4, 99)), branched, loader=loader)
    for a, b in zip(trunk.events, branched.events):
        same = torch.equal(a.latents, b.latents)
        assert same == (a.step < 4), a.step  # step 4 draws the branch's noise: its x_{t-1} differs


def test_branch_diversity_falls_as_the_branch_point_moves_later(loader):
    for prompt, seed in PROMPTS[:2]:
        req = request(loader, prompt, seed, scheduler="euler_a", num_inference_steps=10)
        report = explain.finish(explain.branch(req, [0.1, 0.4, 0.7], 3, loader=loader))
        d = [p.diversity for p in report.points]
        assert report.stochastic and d[0] > d[1] > d[2] > 0, d
        assert [p.step for p in report.points] == [1, 4, 7]


def test_branching_at_the_last_step_changes_nothing_for_euler_a(loader):
    """Euler ancestral's last step goes to σ = 0 and adds no noise, so a branch there is the trunk."""
    report = explain.finish(explain.branch(request(loader, scheduler="euler_a", num_inference_steps=6), [0.99], 2,
                                           loader=loader))
    assert report.points[0].step == 5 and report.points[0].diversity == 0.0


def test_branches_of_a_deterministic_sampler_are_identical(loader):
    report = explain.finish(explain.branch(request(loader, scheduler="ddim", num_inference_steps=6), [0.0, 0.5], 2,
                                           loader=loader))
    assert not report.stochastic
    assert [p.diversity for p in report.points] == [0.0, 0.0]
    for p in report.points:
        assert all(np.array_equal(np.asarray(i), np.asarray(report.trunk)) for i in p.images)


def test_sweep_has_exactly_the_requested_cells_in_order_with_matched_seeds(loader):
    x, y = explain.parse_axis("guidance_scale=1,5"), explain.parse_axis("steps=2,4")
    reports = list(explain.sweep(request(loader, seed=11), x, y, loader=loader))
    assert [len(r.cells) for r in reports] == [1, 2, 3, 4] and reports[-1].done  # one partial result per cell
    cells = reports[-1].cells
    assert [(c.x, c.y) for c in cells] == [(1.0, 2), (5.0, 2), (1.0, 4), (5.0, 4)]  # row-major: x varies fastest
    assert [(c.row, c.col) for c in cells] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(c.request.guidance_scale, c.request.num_inference_steps) for c in cells] == [(1, 2), (5, 2), (1, 4), (5, 4)]
    assert {c.result.seed for c in cells} == {11}
    assert [c.result.steps_completed for c in cells] == [2, 2, 4, 4]
    assert len({np.asarray(c.image).tobytes() for c in cells}) == 4


def test_sweep_over_seeds_and_methods(loader):
    report = explain.finish(explain.sweep(request(loader, num_inference_steps=3), explain.parse_axis("seed=5,6"),
                                          explain.parse_axis("guidance=cfg,apg"), loader=loader))
    assert [(c.result.seed, c.request.guidance) for c in report.cells] == [(5, "cfg"), (6, "cfg"), (5, "apg"), (6, "apg")]


@pytest.mark.parametrize("text,message", [
    ("colour=1,2", "NAME one of guidance_scale, steps"),
    ("steps=2,2.5", "whole numbers"),
    ("steps=", "has no values"),
    ("guidance_scale=1,1", "repeats a value"),
])
def test_bad_axes_say_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message):
        explain.parse_axis(text)


def test_sweep_refuses_a_bad_cell_before_running(loader):
    with pytest.raises(ValueError, match="sweep cell guidance_scale=200.0: guidance_scale must be from 0 to 100"):
        next(explain.sweep(request(loader), explain.parse_axis("guidance_scale=1,200"), loader=loader))
    with pytest.raises(ValueError, match="both steps"):
        next(explain.sweep(request(loader), explain.parse_axis("steps=1"), explain.parse_axis("steps=2"), loader=loader))


def test_dissect_marks_the_guidance_interval(loader):
    req = request(loader, "a large green triangle on the right", 5, guidance="interval", num_inference_steps=10)
    report = explain.finish(explain.dissect(req, loader=loader))
    on = [s.step for s in report.steps if s.guided]
    assert report.interval == (on[0], on[-1]) and 0 < on[0] and len(on) < 10
    for s in report.steps:
        assert (s.x0_cond is not None) == s.guided == (s.guidance_delta_norm is not None)
        assert s.effective_scale == (req.guidance_scale if s.guided else 1.0)
    assert report.steps[0].x0_change is None and all(s.x0_change > 0 for s in report.steps[1:])
    plain = explain.finish(explain.dissect(request(loader, num_inference_steps=4), loader=loader))
    assert plain.interval is None and all(s.guided for s in plain.steps)


PATH_KEYS = {"image", "images", "final", "trunk", "means", "x0"}  # what write() adds to to_dict(): image paths, relative to OUT


def _flat(value) -> list[str]:
    """The paths in a path-key's value: one, none (None), or lists / dicts of them."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [p for v in value for p in _flat(v)]
    return [] if value is None else [value]


def _split(data):
    """(data without its image-path keys, the paths they named), through nested dicts and lists."""
    if isinstance(data, list):
        pairs = [_split(v) for v in data]
        return [n for n, _ in pairs], [p for _, ps in pairs for p in ps]
    if not isinstance(data, dict):
        return data, []
    numbers, paths = {}, []
    for k, v in data.items():
        if k in PATH_KEYS:
            paths += _flat(v)
        else:
            numbers[k], more = _split(v)
            paths += more
    return numbers, paths


def test_every_report_writes_its_numbers_and_the_images_it_kept(loader, jumps, thin_jump, tmp_path):
    """write() saves OUT/<experiment>.json: exactly to_dict() (what the UI and the API show) plus the paths of the
    images it wrote, each a PNG under OUT, and the experiment's picture. A thinned report writes the images it kept;
    σ = ∞ (a zero-terminal-SNR model's first step) is the string "inf" in both, so the files are strict JSON."""
    size = jumps[0].steps[0].image.nbytes
    thin = dataclasses.replace(thin_jump, steps=(dataclasses.replace(thin_jump.steps[0], sigma=float("inf")),
                                                 *thin_jump.steps[1:]))
    small = dict(num_inference_steps=3)
    reports = {  # experiment -> (report, its picture)
        "jump": (thin, "jump.png"),
        "dissect": (explain.finish(explain.dissect(request(loader, num_inference_steps=6), loader=loader,
                                                   max_image_bytes=3 * 3 * size)), "dissect.png"),
        "branch": (explain.finish(explain.branch(request(loader, **small), [0.0, 0.5], 2, loader=loader)), "grid.png"),
        "sweep": (explain.finish(explain.sweep(request(loader, **small), explain.parse_axis("guidance_scale=1,3"),
                                               loader=loader)), "grid.png"),
        "tradeoff": (explain.finish(explain.tradeoff(request(loader, **small), [1.0, 3.0], 2, loader=loader)),
                     "tradeoff.png"),
    }
    written = {}
    for name, (report, picture) in reports.items():
        out = tmp_path / name
        written[name] = data = report.write(out)
        assert json.loads((out / f"{name}.json").read_text()) == data, name
        numbers, paths = _split(data)
        assert numbers == report.to_dict() and numbers["experiment"] == name and numbers["done"], name
        json.dumps(numbers, allow_nan=False)
        assert paths and all(Image.open(out / p).format == "PNG" for p in paths + [picture]), (name, paths)
    assert written["jump"]["steps"][0]["sigma"] == "inf" == thin.to_dict()["steps"][0]["sigma"]
    kept = sorted(set(explain.frame_steps(20, 4)) | {4})
    assert [s["step"] for s in written["jump"]["steps"] if s["image"]] == thin.to_dict()["image_steps"] == kept
    assert [s["step"] for s in written["dissect"]["steps"] if s["images"]] == explain.frame_steps(6, 3)


def test_tradeoff_scores_adherence_and_diversity_with_the_judge(loader):
    report = explain.finish(explain.tradeoff(request(loader, "a large red circle in the center", 10,
                                                     num_inference_steps=10), [1.0, 5.0], 3, loader=loader))
    assert report.targets == {"shape": "circle", "color": "red", "size": "large", "position": "center"}
    assert [p.guidance_scale for p in report.points] == [1.0, 5.0]
    for p in report.points:
        assert p.seeds == (10, 11, 12) and len(p.images) == 3
        assert 0 <= p.adherence <= 1 and p.diversity > 0
    assert report.points[1].adherence >= 0.75  # the recommended scale draws what was asked


@pytest.mark.parametrize("prompt,expected", [
    ("a small blue star in the top-left corner", {"shape": "star", "color": "blue", "size": "small", "position": "top left"}),
    ("A heart in the middle on a green background.", {"shape": "heart", "position": "center", "background": "green"}),
])
def test_judge_targets_read_one_object_prompts(prompt, expected):
    assert explain.judge_targets(prompt) == expected


@pytest.mark.parametrize("prompt,message", [
    ("a red circle above a blue square", "relates two objects"),
    ("a photo of a cat", "name one shape"),
    ("a red blue circle", "several colours"),
])
def test_judge_targets_refuse_what_the_judge_cannot_score(prompt, message):
    with pytest.raises(ValueError, match=message):
        explain.judge_targets(prompt)


def test_stopping_ends_an_experiment_between_and_inside_runs(loader):
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 12  # a few steps into the third run

    reports = list(explain.sweep(request(loader, num_inference_steps=5), explain.parse_axis("seed=1,2,3,4"),
                                 loader=loader, cancelled=cancelled))
    assert [len(r.cells) for r in reports] == [1, 2] and not reports[-1].done


# ---- the Explain lab in the real app, through its named API endpoints ---------------------------------------------


@pytest.fixture(scope="module")
def explain_server(tmp_path_factory, loader):
    """The real app around the embedded model on a free port (tests/serving.py)."""
    from tests.serving import serve

    outputs = tmp_path_factory.mktemp("outputs")
    with serve(loader, outputs, models=[DEFAULT_MODEL]) as (url, demo):
        yield url, outputs, demo.playground


@pytest.fixture(scope="module")
def explain_client(explain_server):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(explain_server[0], verbose=False)


MAIN = dict(prompt="a small blue star in the top left", seed=3, randomize_seed=False, num_inference_steps=6)


def test_every_explain_view_is_a_named_endpoint_that_runs_on_the_worker(explain_client, explain_server):
    *_, playground = explain_server
    jump = explain_client.predict(**MAIN, api_name="/explain_jump")
    assert jump[0].startswith("Done: seed 3") and [s["step"] for s in jump[-1]["steps"]] == list(range(6))
    branch = explain_client.predict(**MAIN, branch_at="0,0.5", branch_n=2, branch_scheduler="ddim",
                                    api_name="/explain_branch")
    assert branch[-1]["diversity"] == [0.0, 0.0] and "deterministic" in branch[0]
    sweep = explain_client.predict(**MAIN, sweep_x="guidance_scale", sweep_x_values="1,5", sweep_y="steps",
                                   sweep_y_values="2,3", api_name="/explain_sweep")
    cells = sweep[-1]["cells"]
    assert [(c["x"], c["y"], c["seed"]) for c in cells] == [(1.0, 2, 3), (5.0, 2, 3), (1.0, 3, 3), (5.0, 3, 3)]
    gallery = sweep[1]["value"] if isinstance(sweep[1], dict) else sweep[1]  # gr.State outputs are not in the API
    assert [g["caption"] for g in gallery] == ["guidance_scale 1 · steps 2", "guidance_scale 5 · steps 2",
                                               "guidance_scale 1 · steps 3", "guidance_scale 5 · steps 3"]
    dissect = explain_client.predict(**MAIN, guidance="interval", api_name="/explain_dissect")
    assert dissect[0].startswith("Done") and len(dissect[-1]["steps"]) == 6
    tradeoff = explain_client.predict(**MAIN, tradeoff_scales="1,5", tradeoff_seeds=2, api_name="/explain_tradeoff")
    assert [p["guidance_scale"] for p in tradeoff[-1]["points"]] == [1.0, 5.0]
    for name, numbers in zip(("jump", "branch", "sweep", "dissect", "tradeoff"), (jump, branch, sweep, dissect, tradeoff)):
        assert numbers[-1]["experiment"] == name and numbers[-1]["done"] and numbers[-1]["seed"] == 3, name
    assert playground.worker.thread is not None and playground.worker.thread.is_alive()


def test_the_jump_gallery_of_a_long_run_shows_evenly_spaced_steps_first_and_last_included(explain_client):
    """A 1000-step run once put 1000 enlarged PNGs in the gallery (~30 s of encoding); every step stays in the
    numbers and under the slider."""
    from ui.explain import JUMP_GALLERY_FRAMES

    n = JUMP_GALLERY_FRAMES + 10
    job = explain_client.submit(**(MAIN | {"num_inference_steps": n}), api_name="/explain_jump")
    numbers = job.result(timeout=120)[-1]
    assert numbers["done"] and [s["step"] for s in numbers["steps"]] == list(range(n))
    # The gallery comes with the full run's report, before the k-step runs (later updates leave it as it is).
    galleries = [out[1] for out in job.outputs() if isinstance(out[1], list) and out[1]]
    assert len(galleries) == 1, [type(out[1]) for out in job.outputs()]
    steps = [int(g["caption"].split(":")[0].removeprefix("step ")) for g in galleries[0]]
    assert len(steps) == JUMP_GALLERY_FRAMES and steps[0] == 1 and steps[-1] == n and steps == sorted(set(steps))


def test_frame_steps_spread_from_the_first_step_to_the_last():
    assert explain.frame_steps(4, 6) == [0, 1, 2, 3]  # fewer steps than frames: every step
    assert explain.frame_steps(20, 6) == [0, 4, 8, 11, 15, 19]
    assert explain.frame_steps(1000, 30)[-1] == 999 and len(explain.frame_steps(1000, 30)) == 30
    with pytest.raises(ValueError, match="at least 1"):
        explain.frame_steps(10, 0)


def test_explain_bad_input_is_a_clear_error(explain_client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="guidance_scale values must be numbers, got .x."):
        explain_client.predict(**MAIN, sweep_x="guidance_scale", sweep_x_values="1,x", api_name="/explain_sweep")
    with pytest.raises(AppError, match="relates two objects"):
        explain_client.predict(**(MAIN | {"prompt": "a red circle above a blue star"}), api_name="/explain_tradeoff")
    with pytest.raises(AppError, match="fractions of the schedule"):
        explain_client.predict(**MAIN, branch_at="0.5,1.5", api_name="/explain_branch")


def _lines(page, selector: str) -> dict[str, str | None]:
    """A plot's drawn lines: series name -> stroke colour (None: Vega drew it in no colour, i.e. invisibly)."""
    found = page.locator(selector).evaluate(
        "e => [...e.querySelectorAll('[aria-roledescription=\"line mark\"]')].map("
        "x => [x.getAttribute('aria-label'), x.getAttribute('stroke')])")
    return {label.rsplit("series: ", 1)[1]: stroke for label, stroke in found}


def test_browser_explain_plots_draw_every_series_of_every_run(explain_server):
    """In Chromium: the k-step runs, which come in later updates of the jump plot, are drawn beside the jump curve
    (Gradio's LinePlot keeps the colour series it first draws, so they once never appeared), and a second
    branching run with another sampler still draws its curve (it once drew an empty plot)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.test_app import _browser, _set_steps

    url, *_ = explain_server
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#history")
        page.get_by_label("Prompt", exact=True).fill(MAIN["prompt"])
        _set_steps(page, 8)
        page.get_by_role("button", name="Run jump vs walk").click()
        page.wait_for_function("() => document.querySelector('#explain-jump-status').innerText.startsWith('Done')",
                               timeout=60000)
        status = page.locator("#explain-jump-status").inner_text()
        runs = int(status.split("k-step runs ")[1].split("/")[0])
        page.wait_for_function(  # the plot redraws just after the status
            "n => [...document.querySelectorAll('#explain-jump-distance [aria-roledescription=point]')]"
            ".filter(x => x.getAttribute('aria-label').endsWith('series: a k-step run')).length === n", arg=runs,
            timeout=10000)
        lines = _lines(page, "#explain-jump-distance")
        assert set(lines) == {"x̂0 at step k (jump now)", "a k-step run"}, lines
        assert None not in lines.values() and len(set(lines.values())) == 2, lines  # both drawn, in two colours

        page.get_by_role("tab", name="Branching").click()
        page.get_by_label("Branch points f (fractions of the schedule)").fill("0,0.5")
        for sampler in ("ddim (deterministic)", "euler_a (stochastic)"):
            page.get_by_label(sampler).check()
            page.get_by_role("button", name="Run branching").click()
            page.wait_for_function(
                "s => document.querySelector('#explain-branch-status').innerText.startsWith('Done') && "
                "document.querySelector('#explain-branch-status').innerText.includes(s)", arg=sampler.split()[0],
                timeout=60000)
            page.wait_for_function(  # two branch points, each with its diversity and x̂0's distance to the mean
                "() => document.querySelectorAll('#explain-branch-plot [aria-roledescription=point]').length === 4",
                timeout=10000)
            lines = _lines(page, "#explain-branch-plot")
            assert len(lines) == 2 and None not in lines.values() and len(set(lines.values())) == 2, (sampler, lines)
        browser.close()
