"""Small CPU UNets run through TorchScript traces (pipelines/traced.py): the same latents, bit for bit, as the
eager model, for every discrete scheduler (int and float timesteps), with and without CFG, on the embedded model
and the tiny SD pipeline; never while PAG has swapped attention processors; not for models it cannot trace."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from pipelines.generate import generate
from pipelines.loading import ModelLoader
from pipelines.schedulers import SCHEDULERS
from pipelines.traced import traceable
from pipelines.types import DEFAULT_MODEL, GenerationRequest
from tests.tiny import tiny_pipeline

# lcm only fits a consistency-distilled UNet, whose parity is tested apart (tests/test_honest_controls.py)
DISCRETE = [k for k, s in SCHEDULERS.items() if s.kind == "discrete" and not s.distilled_only]


@pytest.fixture(scope="module")
def loaders():
    """(traced, eager) loaders over the same tiny SD pipeline object, plus the embedded model."""
    pipe = tiny_pipeline("sd")
    traced, eager = ModelLoader(device="cpu"), ModelLoader(device="cpu", trace=False)
    for loader in (traced, eager):
        loader.add("sd", pipe)
    return traced, eager


def run(loader, **kw):
    base = dict(prompt="a red circle", model="sd", num_inference_steps=4, guidance_scale=5.0, seed=3, width=32, height=32)
    return generate(GenerationRequest(**(base | kw)), loader=loader)


@pytest.mark.parametrize("scheduler", DISCRETE)
def test_traced_runs_equal_eager_runs(loaders, scheduler):
    traced, eager = loaders
    for scale in (5.0, 1.0):  # batch [uncond, cond], and the single conditional pass
        ours, reference = run(traced, scheduler=scheduler, guidance_scale=scale), run(eager, scheduler=scheduler, guidance_scale=scale)
        torch.testing.assert_close(ours.latents, reference.latents, rtol=0, atol=0)
        assert ours.image.tobytes() == reference.image.tobytes()
    traces = traced.traced_unet(traced.get("sd"))
    assert traces is not None and traces.traces, "the traced loader did not trace the tiny SD UNet"
    assert eager.trace is False


def test_embedded_model_is_traced_and_unchanged():
    traced, eager = ModelLoader(device="cpu"), ModelLoader(device="cpu", trace=False)
    request = GenerationRequest(prompt="a small yellow heart in the top left", model=DEFAULT_MODEL, num_inference_steps=6,
                                guidance_scale=5.0, seed=11)
    ours, reference = generate(request, loader=traced), generate(request, loader=eager)
    torch.testing.assert_close(ours.latents, reference.latents, rtol=0, atol=0)
    traces = traced.traced_unet(traced.get(DEFAULT_MODEL))
    assert traces is not None and len(traces.traces) == 1  # one signature: batch 2, the scheduler's timestep dtype
    # The trace's output is the eager UNet's for a timestep it was not traced at.
    unet = traced.get(DEFAULT_MODEL).unet
    (sample_shape, sample_dtype), (t_shape, t_dtype), (e_shape, e_dtype) = next(iter(traces.traces))
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(sample_shape, generator=g), torch.randn(e_shape, generator=g)
    t = torch.tensor(123, dtype=t_dtype)
    with torch.no_grad():
        assert torch.equal(traces(unet, x, t, e), unet(x, t, encoder_hidden_states=e, return_dict=False)[0])


def test_pag_runs_eagerly_and_traces_survive_it(loaders):
    traced, eager = loaders
    plain = run(traced, scheduler="ddim")
    traces = traced.traced_unet(traced.get("sd"))
    kept = dict(traces.traces)
    pag, pag_eager = (run(loader, scheduler="ddim", guidance="pag", guidance_params={"pag_scale": 3.0})
                      for loader in loaders)
    torch.testing.assert_close(pag.latents, pag_eager.latents, rtol=0, atol=0)
    assert not torch.equal(pag.latents, plain.latents)  # the perturbed pass really ran
    # PAG put the original processors back, so the traces are still the ones to use, and still right.
    assert traced.traced_unet(traced.get("sd")) is traces and traces.traces.keys() == kept.keys()
    torch.testing.assert_close(run(traced, scheduler="ddim").latents, plain.latents, rtol=0, atol=0)


def test_changed_attention_processors_drop_the_traces():
    pipe = tiny_pipeline("sd")
    traced, eager = ModelLoader(device="cpu"), ModelLoader(device="cpu", trace=False)
    for loader in (traced, eager):
        loader.add("sd", pipe)
    before = run(traced)
    assert traced.traced_unet(pipe).traces
    pipe.unet.set_attn_processor(AttnProcessor())  # what a user swapping attention implementations does
    assert traced.traced_unet(pipe) is None  # the old traces are gone (a run asking now would go eagerly)
    after, reference = run(traced), run(eager)
    torch.testing.assert_close(after.latents, reference.latents, rtol=0, atol=0)
    torch.testing.assert_close(after.latents, before.latents, rtol=1e-5, atol=1e-5)  # same maths, other kernels
    assert traced.traced_unet(pipe).traces  # and the next runs trace the new processors


def test_models_it_cannot_trace_run_eagerly(tiny_loader):
    for family in ("sdxl", "pixart_sigma", "sd3"):  # added conditioning, or no UNet at all
        pipe = tiny_loader.get(family)
        assert not traceable(getattr(pipe, "unet", None))
        assert tiny_loader.traced_unet(pipe) is None
    assert traceable(tiny_loader.get("sd").unet)


def test_warm_up_loads_and_traces_the_default_model_and_writes_nothing(tmp_path):
    from ui.state import Playground

    loader = ModelLoader(device="cpu")
    playground = Playground(loader, [DEFAULT_MODEL], DEFAULT_MODEL, tmp_path, preview_interval=0.0)
    assert loader.loaded(DEFAULT_MODEL) is None
    playground.warm_up().result(timeout=120)
    pipe = loader.loaded(DEFAULT_MODEL)
    assert pipe is not None and loader.traced_unet(pipe).traces
    assert list(tmp_path.iterdir()) == [] and not playground.runs
    assert playground.worker.thread is not None  # on the worker, whose OpenMP team the runs then reuse
    assert Playground(ModelLoader(device="cuda"), [DEFAULT_MODEL], DEFAULT_MODEL, tmp_path, 0.0).warm_up() is None
