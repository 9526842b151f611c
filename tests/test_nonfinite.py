"""NaN or infinite latents stop a run with a message naming the step, the scheduler and what to try, instead of a
black image reported as done (issue 22).

The real case: diffusers 0.42's DPM-Solver with 'linspace' timestep spacing, which `dpmpp_2m` gets from an SD 1.x
PNDM config (tests/tiny.py's "sd", as SD 1.5's own), rounds both 499.5 and 500.5 to timestep 500 at 1000 steps; the
second step on t = 500 divides by a zero log-SNR step and the latents turn NaN. The stock pipeline does the same.
The embedded model's trailing spacing gives 999..0 with no repeat, and its 1000-step run finishes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines.errors import NonFiniteLatents, client_message
from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.observers import CollectingObserver
from pipelines.schedulers import make_scheduler
from pipelines.types import GenerationRequest
from tests.tiny import tiny_pipeline

EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "models" / "tiny-shapes"
BAD_STEP = 501  # 1-based: the step that repeats t = 500 (found by running it, below and in the stock pipeline)


def sd_request(steps: int) -> GenerationRequest:
    # CFG off: the NaN comes from the schedule, and one UNet call per step keeps the 1000-step runs at ~1-2 s.
    return GenerationRequest(prompt="a red circle", model="sd", scheduler="dpmpp_2m", num_inference_steps=steps,
                             guidance_scale=1.0, seed=0, width=16, height=16)


@pytest.fixture(scope="module")
def loader() -> ModelLoader:
    loader = ModelLoader(device="cpu")
    loader.add("sd", tiny_pipeline("sd"))
    return loader


@pytest.fixture(scope="module")
def failed_run(loader) -> tuple[NonFiniteLatents, CollectingObserver]:
    """The 1000-step run, once: its error and what the observer saw before it."""
    observer = CollectingObserver()
    with pytest.raises(NonFiniteLatents) as caught:
        generate(sd_request(1000), observer, loader=loader)
    return caught.value, observer


def test_dpmpp_2m_at_1000_steps_stops_at_the_repeated_timestep(failed_run):
    error, _ = failed_run
    assert isinstance(error, ValueError)  # every handler that shows bad input as one line shows this too
    assert (error.step, error.num_steps, error.scheduler) == (BAD_STEP, 1000, "dpmpp_2m")
    text = str(error)
    for part in ("step 501 of 1000", "'dpmpp_2m'", "repeats timestep 500", "try 999 steps", "such as euler"):
        assert part in text, text
    assert client_message(error) == text  # the app's one line keeps it whole: no paths, under the length cut


def test_the_observer_sees_only_finite_steps(failed_run):
    """Latents turn non-finite first (x̂0 only a step later), so checking the latents is enough; the broken step
    never reaches the observer (a trace writer would write black previews of it)."""
    _, observer = failed_run
    assert [e.step for e in observer.events] == list(range(BAD_STEP - 1))
    assert all(torch.isfinite(e.latents).all() and torch.isfinite(e.denoised).all() for e in observer.events)


def test_999_steps_finish_with_an_image(failed_run, loader):
    # After failed_run on the same loader: the view's scheduler starts afresh after an error.
    result = generate(sd_request(999), loader=loader)
    assert result.steps_completed == 999 and not result.cancelled
    assert torch.isfinite(result.latents).all()
    assert np.asarray(result.image).max() > 0  # the failing run's image was all zeros


def test_a_run_cancelled_before_the_bad_step_ends_normally(loader):
    """Cancel (the Stop button, the time limit) still returns the last x̂0 decoded; the check only acts on
    latents that are not finite."""
    result = generate(sd_request(1000), CollectingObserver(cancel_after=BAD_STEP - 1), loader=loader)
    assert result.cancelled and result.steps_completed == BAD_STEP - 1
    assert np.asarray(result.image).max() > 0


def test_stock_diffusers_goes_non_finite_at_the_same_step():
    """Why the loop detects rather than trusts: the stock pipeline with the same scheduler makes the same NaN."""
    pipe = tiny_pipeline("sd")
    stock = StableDiffusionPipeline(**(pipe.components | {"scheduler": make_scheduler(pipe.scheduler, "dpmpp_2m")}))

    class Stop(Exception):
        """Raised by the callback at the first non-finite latents: the rest of the run is NaN arithmetic."""

    def watch(p, i, t, tensors):
        if not torch.isfinite(tensors["latents"]).all():
            raise Stop(i + 1)
        return {}

    with pytest.raises(Stop) as stopped:
        stock("a red circle", num_inference_steps=1000, guidance_scale=1.0, height=16, width=16, output_type="latent",
              generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=watch)
    assert stopped.value.args == (BAD_STEP,)


@pytest.mark.skipif(not (EMBEDDED / "model_index.json").exists(), reason="embedded model not installed")
def test_embedded_models_1000_dpmpp_2m_steps_repeat_no_timestep():
    """The public default at the small-model step cap: its trailing spacing gives 1000 distinct timesteps (the
    repeat is what turns the latents NaN above), so its 1000-step run ends with an image. The schedule is checked,
    not run: a 1000-step CFG run of the embedded model costs ~25 s of the suite, and its schedule is the cause."""
    loader = ModelLoader(device="cpu")
    view, key = loader.view("tiny-shapes", "dpmpp_2m")
    view.scheduler.set_timesteps(1000)
    timesteps = [int(t) for t in view.scheduler.timesteps]
    assert key == "dpmpp_2m" and len(timesteps) == 1000 and len(set(timesteps)) == 1000, timesteps[495:505]
