"""The one request builder (UI, HTTP API and CLI all call it): sentinels, recommended values, refusals."""

from __future__ import annotations

import json
import threading

import pytest

from pipelines.loading import ModelLoader
from pipelines.requests import OWN_SCHEDULER, build_request, parse_guidance_params, whole_number
from pipelines.types import DEFAULT_MODEL, MAX_STEPS
from pipelines.worker import GenerationWorker, generate_on


@pytest.fixture(scope="module")
def loader():
    from tests.tiny import tiny_pipeline

    loader = ModelLoader(device="cpu", allowed=[DEFAULT_MODEL, "tiny-sd"])
    loader.add("tiny-sd", tiny_pipeline("sd"))
    return loader


def test_sentinels_mean_recommended_random_native_and_own(loader):
    r = build_request(prompt="a red circle", model=DEFAULT_MODEL, loader=loader, num_inference_steps=-1,
                      guidance_scale=-1, seed=-1, width=0, height=0, scheduler="", guidance="")
    assert (r.num_inference_steps, r.guidance_scale) == (20, 3.0)  # the embedded model's registry entry
    assert r.seed is None and r.width is None and r.height is None and r.scheduler is None and r.guidance == "cfg"
    assert build_request(prompt="x", model=DEFAULT_MODEL, loader=loader, scheduler=OWN_SCHEDULER).scheduler is None


def test_unknown_model_takes_its_stock_pipeline_defaults(loader):
    r = build_request(prompt="x", model="tiny-sd", loader=loader)
    assert (r.num_inference_steps, r.guidance_scale) == (50, 7.5)  # StableDiffusionPipeline.__call__ defaults


def test_widget_floats_are_whole_numbers_or_refused(loader):
    r = build_request(prompt="x", model="tiny-sd", loader=loader, num_inference_steps=12.0, seed=7.0, width=32.0)
    assert (r.num_inference_steps, r.seed, r.width) == (12, 7, 32)
    for field, value in (("num_inference_steps", 1.5), ("seed", 1.5), ("width", 33.3), ("seed", "abc")):
        with pytest.raises(ValueError, match=f"{field} must be a whole number"):
            build_request(prompt="x", model="tiny-sd", loader=loader, **{field: value})


@pytest.mark.parametrize("kwargs, allowed", [
    ({"num_inference_steps": 0}, f"from 1 to {MAX_STEPS}"),
    ({"num_inference_steps": MAX_STEPS + 1}, f"from 1 to {MAX_STEPS}"),
    ({"guidance_scale": 1e12}, "from 0 to 100"),
    ({"guidance_scale": float("nan")}, "finite"),
    ({"seed": -5}, "from 0 to 2**63-1"),
    ({"model": "not-offered"}, "choose one of"),
    ({"guidance_params": "[1]"}, "JSON object"),
    ({"guidance_params": '{"guidance_rescale": "x"}'}, "must be a number"),
])
def test_refusals_say_what_is_allowed(loader, kwargs, allowed):
    with pytest.raises(ValueError, match=allowed.replace("*", r"\*")):
        build_request(**({"prompt": "x", "model": "tiny-sd", "loader": loader} | kwargs))


def test_parsers():
    assert whole_number("n", "20") == 20 and whole_number("n", 20.0) == 20
    with pytest.raises(ValueError):
        whole_number("n", True)
    assert parse_guidance_params('{"guidance_rescale": 0.7}') == {"guidance_rescale": 0.7}
    assert parse_guidance_params(None) == {} and parse_guidance_params("") == {}


def test_worker_runs_every_job_on_one_long_lived_thread(loader):
    worker = GenerationWorker()
    names = [worker.run(lambda: threading.current_thread()) for _ in range(3)]
    assert len(set(map(id, names))) == 1 and names[0] is worker.thread and names[0] is not threading.main_thread()
    with pytest.raises(ZeroDivisionError):  # a failing job reaches its caller; the worker keeps going
        worker.run(lambda: 1 / 0)
    assert worker.run(lambda: 2) == 2 and worker.thread is names[0]
    request = build_request(prompt="a red circle", model="tiny-sd", loader=loader, num_inference_steps=2, seed=1)
    result = generate_on(worker, request, loader=loader).result()
    assert result.steps_completed == 3 and worker.thread is names[0]  # PNDM: N + 1 iterations


def test_thread_count_is_measured_per_model_and_size(loader):
    """A tiny UNet's call is microseconds of work split over two threads' barriers: one thread wins, and the probe
    says so with its numbers; the choice is kept per size and setting, and dropped with the model."""
    one = loader.threads("tiny-sd", None, None, serving=True, default=2)
    assert one.threads == 1 and set(one.seconds) == {1, 2} and "1 thread" in one.why
    assert loader.threads("tiny-sd", None, None, serving=True, default=2) is one  # measured once
    assert loader.threads("tiny-sd", 64, 64, serving=False, default=2) is not one
    assert loader.threads("tiny-sd", None, None, serving=False, default=1).seconds == {}  # one core: nothing to probe
    on_gpu = ModelLoader(device="cuda")  # never runs here: the choice is made from the device
    from pipelines import threads

    assert threads.choose(loader.get("tiny-sd").unet, (16, 16), on_gpu.device, 2, True).threads == 2


def test_thread_choice_is_kept_on_disk_for_the_next_process(loader, tmp_path):
    """A second loader (the next CLI process) reads the count measured by the first instead of probing again; the
    key is the architecture, size and setting, so another size or a stale entry is measured afresh."""
    from pipelines import threads

    cache = threads.ThreadCache(tmp_path / "threads.json")
    first = ModelLoader(device="cpu", thread_cache=cache)
    first.add("tiny-sd", loader.get("tiny-sd"))
    measured = first.threads("tiny-sd", None, None, serving=False, default=2)
    assert set(measured.seconds) == {1, 2} and "earlier" not in measured.why

    second = ModelLoader(device="cpu", thread_cache=cache)
    second.add("tiny-sd", loader.get("tiny-sd"))
    again = second.threads("tiny-sd", None, None, serving=False, default=2)
    assert (again.threads, again.seconds) == (measured.threads, measured.seconds)
    assert again.why.endswith("(measured earlier on this machine)")
    assert "earlier" not in second.threads("tiny-sd", 64, 64, serving=False, default=2).why  # another size

    data = json.loads(cache.path.read_text())
    for entry in data.values():
        entry["at"] -= (threads.CACHE_DAYS + 1) * 86400
    cache.path.write_text(json.dumps(data))
    third = ModelLoader(device="cpu", thread_cache=cache)
    third.add("tiny-sd", loader.get("tiny-sd"))
    assert "earlier" not in third.threads("tiny-sd", None, None, serving=False, default=2).why
    cache.path.write_text("not json")  # a damaged file is a miss, not an error
    assert threads.ThreadCache(cache.path).get("anything") is None
