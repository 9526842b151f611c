"""The app as a public Space sees it: callers that cancel or vanish mid-run, many runs from one client, and
memory that must not grow with what strangers ask for. Served for real around a tiny real pipeline."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import httpx
import pytest

from pipelines.limits import Limits
from pipelines.loading import ModelLoader
import tests.serving
from tests.serving import wait_until
from tests.tiny import tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")

MODEL = "tiny-sd"
ROOT = Path(__file__).resolve().parent.parent
# A long run: ~12 s of worker time on this CPU for the tiny model at 64² (its UNet traced), far longer than any
# wait or time limit below, and within the small tier's default work budget (64 · 64 · 999 <= 2**22).
LONG_STEPS = 999  # the tiny model's PNDM schedule takes at most 999
LONG = {"num_inference_steps": LONG_STEPS, "width": 64, "height": 64}


@contextlib.contextmanager
def serve(outputs, loader: ModelLoader | None = None, **kwargs):
    """The real app (on the tiny model unless `loader` says otherwise) on a free port: yields (url, demo)."""
    if loader is None:
        loader = ModelLoader(device="cpu")
        loader.add(MODEL, tiny_pipeline("sd"))
        kwargs = dict(models=[MODEL], preview_interval=0.05) | kwargs
    with tests.serving.serve(loader, outputs, **kwargs) as served:
        yield served


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with python app.py's per-client limit (4; its admission counts each client's events):
    (url, playground)."""
    with serve(tmp_path_factory.mktemp("outputs"), max_runs_per_client=4) as (url, demo):
        yield url, demo.playground


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def _quick(client) -> dict:
    """A 2-step run through /generate: the server still serves (its info)."""
    return client.predict(prompt="x", num_inference_steps=2, seed=1, api_name="/generate")[2]


@pytest.mark.parametrize("api", ["/generate", "/generate_stream"])
def test_a_cancelled_run_frees_the_worker_and_leaves_no_threads(server, client, api):
    _, playground = server
    _quick(client)
    for _ in range(3):
        job = client.submit(prompt="x", **LONG, seed=2, api_name=api)
        # The long run is on the worker and stepping.
        wait_until(lambda: playground.pending and playground.pending[0].steps, 30, "the long run never started")
        run = playground.pending[0]
        job.cancel()
        # The cancelled run stops at a step boundary, long before its 999 steps, and the next request runs.
        wait_until(lambda: run.done.is_set(), 60, f"a cancelled {LONG_STEPS}-step run never ended")
        assert len(run.steps) < LONG_STEPS, f"a cancelled run went on to step {len(run.steps)}"
        assert _quick(client)["steps_completed"] == 3
    assert not playground.active and not playground.pending
    # No thread is left inside the app's handlers (a /generate blocked on its run held one per cancelled call);
    # the worker waits for its next job and the thread pools idle.
    wait_until(lambda: not _threads_in(ROOT / "ui"), 10, f"threads stayed in the app's handlers: {_threads_in(ROOT / 'ui')}")


def _threads_in(folder) -> list[str]:
    """Names of the threads (other than this one) whose stack is somewhere in `folder`'s code."""
    import sys
    import traceback

    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    return [names.get(ident, str(ident)) for ident, frame in sys._current_frames().items() if ident != me
            and any(f.filename.startswith(str(folder)) for f in traceback.extract_stack(frame))]


def test_a_stream_whose_client_goes_away_stops_its_run(server, client):
    url, playground = server
    info = httpx.get(f"{url}gradio_api/info").json()["named_endpoints"]["/generate_stream"]["parameters"]
    values = {p["parameter_name"]: p.get("parameter_default") for p in info} | {"prompt": "x"} | LONG
    event = httpx.post(f"{url}gradio_api/call/generate_stream",
                       json={"data": [values[p["parameter_name"]] for p in info]}).json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/generate_stream/{event}", timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: generating"):
                run = playground.pending[0]
                break  # the run is going; now the client disappears
    wait_until(lambda: run.done.is_set(), 60, f"an abandoned {LONG_STEPS}-step stream never ended")
    assert len(run.steps) < LONG_STEPS, f"an abandoned stream's run went on to step {len(run.steps)}"
    assert _quick(client)["steps_completed"] == 3


API_PARAMETERS = ["prompt", "negative_prompt", "model", "scheduler", "num_inference_steps", "guidance_scale", "seed",
                  "width", "height", "guidance", "guidance_params", "num_images_per_prompt", "true_cfg_scale"]


def test_generate_and_generate_stream_take_one_request_shape(server):
    """/gradio_api/info: the stream takes /generate's parameters by the same names with the same defaults (none of
    the UI's widgets: randomize_seed, x0_preview, per-method sliders), and the UI's own Generate events are private."""
    url, _ = server
    endpoints = httpx.get(f"{url}gradio_api/info").json()["named_endpoints"]
    shape = {api: [(p["parameter_name"], p["parameter_has_default"], p["parameter_default"])
                   for p in endpoints[api]["parameters"]] for api in ("/generate", "/generate_stream")}
    assert shape["/generate_stream"] == shape["/generate"], shape
    assert [name for name, _, _ in shape["/generate"]] == API_PARAMETERS
    assert dict((n, d) for n, _, d in shape["/generate"]) == {
        "prompt": None, "negative_prompt": "", "model": MODEL, "scheduler": "", "num_inference_steps": -1,
        "guidance_scale": -1, "seed": -1, "width": 0, "height": 0, "guidance": "", "guidance_params": "",
        "num_images_per_prompt": 1, "true_cfg_scale": 1}
    assert [r["label"] for r in endpoints["/generate_stream"]["returns"]] == [
        "status", "latents x_t", "predicted x0", "image", "seed", "info", "images"]
    assert [r["label"] for r in endpoints["/generate"]["returns"]] == ["image", "seed", "info", "images"]
    assert not [name for name in endpoints if "run_ui" in name], sorted(endpoints)


def test_the_stream_shows_steps_and_ends_on_generates_image(server, client):
    """Per-step previews (x_t and x̂0 files, no image yet), then the image, seed and info: the same pixels as
    /generate's for the same seed and settings."""
    import re

    import numpy as np
    from PIL import Image

    settings = dict(prompt="a red circle", num_inference_steps=60, guidance_scale=5, seed=3, width=64, height=64)
    job = client.submit(**settings, api_name="/generate_stream")
    final = job.result(timeout=120)
    updates = job.outputs()
    status, latents, x0, image, seed, info, images = final
    n = info["steps_completed"]  # 61: PNDM runs one more
    assert n >= 60 and seed == 3 and (info["width"], info["height"]) == (64, 64), info
    assert status.startswith(f"Done: {n} steps") and "seed 3" in status, status
    assert Path(latents).is_file() and Path(x0).is_file(), final  # the last step's previews
    assert updates[-1] == final and len(updates) >= 3, updates
    steps = []
    for update in updates[:-1]:
        assert update[3:6] == (None, 3, None) and not update[6], update  # no image, info or images before the end;
        # the seed from the start
        match = re.fullmatch(rf"Step (\d+) / {n} · [\d.]+ it/s · σ = \S+", update[0])
        if match:
            assert Path(update[1]).is_file() and Path(update[2]).is_file(), update
            steps.append(int(match[1]))
    assert steps and steps == sorted(set(steps)) and steps[-1] <= n, updates  # newest only, never the same twice

    assert [i["caption"] for i in images] == ["seed 3"] and np.array_equal(  # one image: the image itself
        np.asarray(Image.open(images[0]["image"])), np.asarray(Image.open(image))), images
    path, api_seed, api_info, _ = client.predict(**settings, api_name="/generate")
    assert api_seed == 3 and api_info.keys() == info.keys() and api_info["run"] != info["run"]
    assert {k: v for k, v in api_info.items() if k not in ("run", "seconds")} == {
        k: v for k, v in info.items() if k not in ("run", "seconds")}
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(path)))


def test_the_stream_refuses_bad_input_saying_what_is_allowed_and_keeps_serving(server, client):
    from pipelines.families import family_of

    _, playground = server
    pipe = playground.loader.loaded(MODEL) or playground.loader.get(MODEL)
    factor = family_of(pipe).size_multiple(pipe)
    width = 4 * factor + 1
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        client.predict(prompt="x", width=width, num_inference_steps=2, api_name="/generate_stream")
    text = str(e.value)
    assert f"width {width} is not a multiple of {factor}" in text and "use a multiple of" in text, text
    assert str(ROOT) not in text and "Traceback" not in text
    assert not playground.pending
    *_, seed, info, _ = client.predict(prompt="x", num_inference_steps=2, seed=1, api_name="/generate_stream")
    assert seed == 1 and info["steps_completed"] == 3
    assert _quick(client)["steps_completed"] == 3


def test_the_pages_generate_button_still_streams_its_run(server):
    """The Generate button's event, private now, as the page drives it (queue join + server-sent events): step
    statuses while it goes, then the final image and the seed it drew, in the page's own outputs."""
    import json
    import re

    from gradio_client.utils import apply_diff

    url, _ = server
    config = httpx.get(f"{url}config").json()
    widgets = {c["id"]: c for c in config["components"]}
    button = next(i for i, c in widgets.items() if c["type"] == "button" and c["props"].get("value") == "Generate")
    event = next(d for d in config["dependencies"] if [button, "click"] in d["targets"] and d["outputs"])
    assert event["api_visibility"] == "private"
    values = [widgets[i]["props"].get("value") for i in event["inputs"]]
    prompt = next(n for n, i in enumerate(event["inputs"]) if widgets[i]["props"].get("label") == "Prompt")
    values[prompt] = "a red circle"
    session = "page-test"
    httpx.post(f"{url}gradio_api/queue/join", json={"data": values, "fn_index": event["id"], "session_hash": session,
                                                    "event_data": None, "trigger_id": None}).raise_for_status()
    statuses, outputs = [], []
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") in ("process_generating", "process_completed") and msg.get("output", {}).get("data"):
                data = msg["output"]["data"]
                outputs = ([apply_diff(o, d) for o, d in zip(outputs, data)]
                           if msg["msg"] == "process_generating" and outputs else list(data))
                statuses.append(outputs[0])
            if msg.get("msg") == "process_completed":
                assert msg.get("success"), msg
                break
    assert any(re.match(r"Step \d+ / 51 · ", s) for s in statuses), statuses  # the tiny model's 50 PNDM steps + 1
    done = re.match(r"Done: 51 steps .* seed (\d+)\.", statuses[-1])
    assert done and outputs[-1] == int(done[1]), (statuses[-1], outputs[-1])  # the seed field shows the seed drawn
    final = outputs[4]  # live.final_image
    assert final and Path(final["path"]).is_file(), final


def test_a_bounded_recorder_thins_old_steps_and_keeps_the_newest():
    import torch

    from pipelines.observers import StepRecorder
    from pipelines.types import StepEvent

    step_bytes = 3 * 4 * 8 * 8 * 4  # latents, x̂0, x̂0_cond (float32, 4×8×8); no uncond
    recorder = StepRecorder(max_bytes=10 * step_bytes)
    for i in range(100):
        z = torch.full((1, 4, 8, 8), float(i))
        recorder.on_step(StepEvent(step=i, num_steps=100, timestep=999.0 - i, sigma=1.0, latents=z, denoised=z,
                                   denoised_cond=z, denoised_uncond=None, guidance_delta_norm=0.5,
                                   effective_scale=5.0, elapsed=0.0))
        assert recorder.nbytes <= 10 * step_bytes and recorder.steps[-1].kept
    kept = [r.step for r in recorder.steps if r.kept]
    assert len(recorder.steps) == 100 and [r.step for r in recorder.steps] == list(range(100))  # numbers all stay
    assert recorder.stride == 16 and kept == [0, 16, 32, 48, 64, 80, 96, 99], kept
    assert recorder.steps[37].latents is None and recorder.nearest_kept(37) == 32 and recorder.nearest_kept(98) == 99
    assert float(recorder.steps[recorder.nearest_kept(50)].latents[0, 0, 0, 0]) == 48.0
    unbounded = StepRecorder()
    assert unbounded.max_bytes is None and unbounded.stride == 1


def test_scrub_memory_stays_bounded_over_many_runs(tmp_path):
    """Long runs through the real Playground: the step tensors it holds stay under its budgets, a thinned
    run still scrubs (nearest kept step) and says so."""
    from pipelines.types import GenerationRequest
    from ui.state import Playground

    loader = ModelLoader(device="cpu")
    pipe = tiny_pipeline("sd")
    loader.add(MODEL, pipe)
    side = pipe.unet.config.sample_size // 2  # runs at half the model's size: the budgets count steps, not pixels
    per_step = 4 * (4 * side * side * 4)  # latents, x̂0, cond and uncond: (1, 4, side, side) float32 each
    playground = Playground(loader, [MODEL], MODEL, tmp_path, 0.0, scrub_bytes_per_run=20 * per_step,
                            scrub_bytes_total=50 * per_step)
    size = side * pipe.vae_scale_factor
    try:
        for seed in range(6):
            run = playground.start(GenerationRequest("x", model=MODEL, num_inference_steps=120, seed=seed, width=size,
                                                     height=size), "fast", None)
            assert run.done.wait(120) and run.error is None, run.error
            assert run.recorder.nbytes <= 20 * per_step and len(run.steps) == run.result.num_steps >= 120
            assert sum(r.recorder.nbytes for r in playground.runs.values()) <= 50 * per_step
        assert 1 <= len(playground.runs) <= 3  # older runs were dropped for their tensors, newest first kept
        assert run.run_id in playground.runs
        assert playground.render(run, 37, "x0") is not None  # shown from the nearest kept step
        assert "to bound memory" in playground.step_text(run, 37)
    finally:
        playground.worker.close()


def test_one_client_cannot_fill_the_queue_and_a_run_has_a_time_limit(tmp_path):
    """Through a real server: a client's third concurrent run is refused with the limit and its variable, its
    first two finish; a run past the wall-clock limit stops at a step boundary and says why."""
    with serve(tmp_path, max_runs_per_client=2, limits=Limits(max_run_seconds=1.5)) as (url, demo):
        client = gradio_client.Client(url, verbose=False)
        jobs = [client.submit(prompt="x", **LONG, seed=i, api_name="/generate") for i in range(2)]
        deadline = time.time() + 30
        while len(demo.playground.pending) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert len(demo.playground.pending) == 2, "the long runs never started"
        with pytest.raises(Exception, match="PLAYGROUND_MAX_RUNS_PER_CLIENT"):
            client.predict(prompt="x", num_inference_steps=2, api_name="/generate")
        for job in jobs:  # both stopped by the 1.5 s limit, long before their 999 steps
            _, _, info, _ = job.result(timeout=60)
            assert 0 < info["steps_completed"] < LONG_STEPS, info
        run = demo.playground.runs[info["run"]]
        assert run.time_limit.expired and run.result.cancelled
        status = client.predict(prompt="x", **LONG, seed=5, api_name="/generate_stream")[0]
        assert "Stopped at step" in status and "at most 1.5 s" in status and "PLAYGROUND_MAX_RUN_SECONDS" in status
        assert _quick(client)["steps_completed"] == 3  # and the server keeps serving


def _api_value(value) -> bool:
    """Whether `value` can be sent to /generate's widgets as is (finite JSON numbers for Number fields)."""
    import math

    return value is None or isinstance(value, str) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and abs(value) < 2**53)


@pytest.fixture(scope="module")
def embedded_client(tmp_path_factory):
    """The app on the embedded model only, as `python app.py` serves it (built-in limits)."""
    from pipelines.types import DEFAULT_MODEL

    with serve(tmp_path_factory.mktemp("outputs"), ModelLoader(device="cpu", allowed=[DEFAULT_MODEL]),
               models=[DEFAULT_MODEL]) as (url, _):
        yield gradio_client.Client(url, verbose=False)


def test_the_api_refuses_the_same_bad_inputs_and_keeps_serving(embedded_client):
    """tests/test_limits.py's table, through HTTP: every row whose values /generate's fields can carry (and whose
    model is this server's) is refused with the same message, in one line without server paths, by /generate and
    by /generate_stream (one request shape)."""
    import re

    from tests.test_limits import BAD_INPUTS

    numeric = {"num_inference_steps", "guidance_scale", "seed", "width", "height"}
    rows = [(kw, msg) for kw, msg in BAD_INPUTS if "model" not in kw and "sd-turbo" not in msg
            and all(_api_value(v) and (k not in numeric or not isinstance(v, str)) for k, v in kw.items())
            and all(isinstance(v, str) for k, v in kw.items() if k not in numeric)]
    assert len(rows) >= 25, len(rows)  # 29 of the 56 today
    for kwargs, message in rows:
        for api in ("/generate", "/generate_stream"):
            with pytest.raises(gradio_client.exceptions.AppError) as e:
                embedded_client.predict(**({"prompt": "a red circle"} | kwargs), api_name=api)
            text = str(e.value)
            assert re.search(message, text), (api, kwargs, text[:300])
            assert str(ROOT) not in text and "Traceback" not in text
    _, seed, info, _ = embedded_client.predict(prompt="a red circle", num_inference_steps=3, seed=4, api_name="/generate")
    assert seed == 4 and info["steps_completed"] == 3


def test_a_schedule_past_the_training_timesteps_is_refused_not_crashed():
    """PNDM's default config ('leading', steps_offset=1) at 1000 steps starts at t=1000 of 1000: an IndexError
    deep in the loop (stock diffusers too). It is refused up front with what works; 999 steps run (small and without
    CFG: the schedule is the same at any size and scale, and one 16² UNet call per step keeps the run short)."""
    from pipelines.generate import generate
    from pipelines.types import GenerationRequest

    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    with pytest.raises(ValueError, match=r"cannot take 1000 steps: its first timestep would be 1000, past the 1000 it "
                                         r"was trained on; use at most 999 steps or another scheduler"):
        generate(GenerationRequest("x", model=MODEL, num_inference_steps=1000, seed=0), loader=loader)
    assert generate(GenerationRequest("x", model=MODEL, num_inference_steps=999, seed=0, guidance_scale=1.0, width=16,
                                      height=16), loader=loader).steps_completed


def test_experiment_folders_are_kept_bounded_and_nothing_foreign_is_removed(tmp_path):
    import os

    from pipelines.outputs import prune_experiments

    for i in range(7):
        d = tmp_path / f"2026-{i}"
        d.mkdir()
        (d / "grid.png").write_bytes(b"png")
        os.utime(d, (1000 + i, 1000 + i))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    os.utime(foreign, (1, 1))
    (tmp_path / "link").symlink_to(foreign)
    removed = prune_experiments(tmp_path, 3)
    assert sorted(p.name for p in removed) == [f"2026-{i}" for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2026-4", "2026-5", "2026-6", "link", "notes"]
    assert (foreign / "keep.txt").read_text() == "mine"


def test_explain_experiments_count_against_the_client_limit_and_have_a_time_limit(tmp_path):
    with serve(tmp_path, max_runs_per_client=1, limits=Limits(max_run_seconds=1.0)) as (url, demo):
        client = gradio_client.Client(url, verbose=False)
        job = client.submit(prompt="x", **LONG, seed=1, api_name="/generate")
        deadline = time.time() + 30
        while not demo.playground.pending and time.time() < deadline:
            time.sleep(0.02)
        assert demo.playground.pending, "the long run never started"
        with pytest.raises(Exception, match="PLAYGROUND_MAX_RUNS_PER_CLIENT"):
            client.predict(prompt="x", seed=1, randomize_seed=False, num_inference_steps=4, api_name="/explain_jump")
        job.result(timeout=60)  # stopped by its 1 s limit
        # Each run of an experiment has the per-run limit (the experiment, 4 x that in all): the jump's first run
        # stops at its next step past 1 s, and the experiment says so.
        t0 = time.perf_counter()
        with pytest.raises(Exception, match=r"one run of the experiment took more than 1 s.*PLAYGROUND_MAX_RUN_SECONDS"):
            client.predict(prompt="x", seed=1, randomize_seed=False, **LONG, api_name="/explain_jump")
        assert time.perf_counter() - t0 < 30
        assert demo.playground.admission.count("127.0.0.1") == 0  # its slot is given back
        assert _quick(client)["steps_completed"] == 3


def test_an_explain_experiment_holds_a_bounded_set_of_images_and_says_so(tmp_path):
    """A server's experiment_image_bytes bounds the x̂0 images a jump or dissection keeps in the session: the jump
    gallery and the dissection show kept steps, and the note says the images come from a nearby step."""
    from pipelines import explain

    side = tiny_pipeline("sd").unet.config.sample_size * 2  # pixels (VAE scale 2)
    image = side * side * 3
    with serve(tmp_path, experiment_image_bytes=4 * 3 * image) as (url, demo):
        client = gradio_client.Client(url, verbose=False)
        job = client.submit(prompt="x", seed=1, randomize_seed=False, num_inference_steps=40, api_name="/explain_dissect")
        out = job.result(timeout=120)
        numbers = out[-1]
        n = len(numbers["steps"])
        kept = explain.frame_steps(n, 4)
        k = max(1, n // 4)  # the step the dissection first shows
        near = min(kept, key=lambda i: (abs(i - (k - 1)), i))
        assert near != k - 1 and numbers["image_steps"] == kept, (kept, k, numbers["image_steps"])
        note = next(o for o in out if isinstance(o, str) and o.startswith(f"Step {k} of {n}"))
        assert f"The images are from step {near + 1}, the nearest of the 4 of {n} steps" in note, note

        job = client.submit(prompt="x", seed=1, randomize_seed=False, num_inference_steps=40, api_name="/explain_jump")
        numbers = job.result(timeout=120)[-1]
        n = len(numbers["steps"])
        must = {min(r["steps"], n) - 1 for r in numbers["short_runs"]}  # the jumps the k-step runs are compared with
        assert numbers["image_steps"] == sorted(set(explain.frame_steps(n, 12)) | must)  # 12 images' worth
        gallery = next(o[1] for o in job.outputs() if isinstance(o[1], list) and o[1])
        shown = [int(g["caption"].split(":")[0].removeprefix("step ")) - 1 for g in gallery]
        assert shown == numbers["image_steps"] and len(shown) < n


def test_every_handler_that_runs_the_model_goes_through_the_gpu_decorator(tmp_path):
    """On ZeroGPU, CUDA is there only inside @spaces.GPU handlers: build_demo's `gpu` must wrap the Generate
    stream, /generate, /generate_stream, every Explain experiment and the jump slider's k-step run (it runs one on demand)."""
    import app

    wrapped = []

    def gpu(fn):
        wrapped.append(fn.__name__)
        return fn

    demo = app.build_demo(loader=ModelLoader(device="cpu"), models=[MODEL], outputs_dir=tmp_path, gpu=gpu)
    assert sorted(wrapped) == sorted(["run_ui", "run_api", "run_api_stream", "run_jump", "run_branch", "run_sweep",
                                      "run_dissect", "run_tradeoff", "run_attention", "run_layout", "on_jump_k"]), wrapped
    demo.close()


@pytest.mark.parametrize("api_name", ["/generate", "/generate_stream"])
def test_a_run_whose_latents_go_nan_is_an_error_not_a_black_image(client, api_name):
    """DPM++ 2M at 1000 steps on an SD 1.x schedule repeats timestep 500 and its latents turn NaN at step 501 (stock
    diffusers returns a black image there): over HTTP the run is refused with the step, the scheduler and what to
    try, never "Done" with a black image; the server serves the next run."""
    with pytest.raises(Exception, match=r"step 501 of 1000 with scheduler 'dpmpp_2m'.*try 999 steps"):
        job = client.submit(prompt="x", scheduler="dpmpp_2m", num_inference_steps=1000, guidance_scale=1, seed=0,
                            width=32, height=32, api_name=api_name)
        job.result(timeout=120)
    assert _quick(client)["steps_completed"] >= 2  # PNDM's two steps (it may add its warm-up step)


@pytest.mark.parametrize("api_name", ["/explain_jump", "/explain_sweep"])
def test_a_cancelled_experiment_stops_its_run_at_the_next_step(server, client, api_name):
    """Cancelling an experiment (gradio_client's cancel, as the Stop button's cancels=) stops the run in flight at
    its next step, not at the end of the run or cell: the worker is free long before a 999-step run could end."""
    _, playground = server
    _quick(client)
    wait_until(lambda: playground.admission.count("127.0.0.1") == 0, 10, "the quick run kept its slot")
    extra = {"sweep_x": "seed", "sweep_x_values": "1,2", "sweep_y": ""} if api_name == "/explain_sweep" else {}
    job = client.submit(prompt="x", seed=1, randomize_seed=False, api_name=api_name, **LONG, **extra)
    # Its handler holds the client's slot: the experiment's first 999-step run (~12 s of worker time) is queued.
    wait_until(lambda: playground.admission.count("127.0.0.1") == 1, 30, "the experiment never started")
    job.cancel()
    t0 = time.perf_counter()
    playground.worker.submit(lambda: None).result(timeout=60)  # the worker is free once the run stops
    freed = time.perf_counter() - t0
    assert freed < 5, f"the worker was busy {freed:.1f} s after the cancel: the run went on past its next step"
    wait_until(lambda: playground.admission.count("127.0.0.1") == 0, 10, "the cancelled experiment kept its slot")
    assert _quick(client)["steps_completed"] >= 2
