"""trace.json's one writer and one reader (Trace), and the per-step tensors saved for scrubbing."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from pipelines.generate import generate
from pipelines.observers import CollectingObserver, TeeObserver
from pipelines.outputs import (
    STEP_TENSORS_FILE,
    Trace,
    TraceWriter,
    load_step_tensors,
    save_step_tensors,
)
from pipelines.previews import Previewer
from pipelines.types import GenerationRequest, StepEvent

KEYS = ["image", "seed", "request", "scheduler", "family", "width", "height", "cancelled", "timings",
        "preview_kinds", "latent_format", "steps"]
STEP_KEYS = ["step", "timestep", "sigma", "effective_scale", "guidance_delta_norm", "elapsed", "num_steps", "previews"]


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**({"prompt": "a red circle", "model": "sd", "num_inference_steps": 3, "guidance_scale": 4.0,
                                 "width": 32, "height": 32, "scheduler": "euler"} | kw))


@pytest.fixture(scope="module")
def run(tiny_loader, tmp_path_factory):
    """One tiny run written by TraceWriter (previews and step tensors on), with its events and trace."""
    folder = tmp_path_factory.mktemp("run")
    writer = TraceWriter(folder, Previewer(tiny_loader.get("sd")), tensors_limit_bytes=2**20)
    events = CollectingObserver()
    result = generate(request(), TeeObserver(events, writer), loader=tiny_loader)
    trace = writer.finish(result)
    return folder, trace, events.events, writer, result


def copy_run(folder: Path, tmp_path: Path) -> Path:
    """A writable copy of the run's trace.json and image.png."""
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("trace.json", "image.png"):
        (out / name).write_bytes((folder / name).read_bytes())
    return out


def test_written_trace_reads_back_equal(run) -> None:
    folder, trace, events, _, result = run
    assert Trace.read(folder) == trace
    assert trace.request.seed == result.seed and trace.request == GenerationRequest(**(request().to_dict() | {"seed": result.seed}))
    assert [s.step for s in trace.steps] == [e.step for e in events] == [0, 1, 2]
    assert all(set(s.previews) == {"latents", "x0"} and (folder / s.previews["x0"]).is_file() for s in trace.steps)


def test_json_keeps_the_format_old_runs_have(run) -> None:
    folder, trace, *_ = run
    data = json.loads((folder / "trace.json").read_text())
    # One key added at the end since: torch's thread count on a CPU (the copied diffusers code pins it); older traces
    # without it still read (threads None).
    assert list(data) == KEYS + ["threads"] and all(list(s) == STEP_KEYS for s in data["steps"])
    assert data["request"]["seed"] == data["seed"] and data["image"] == "image.png"
    assert list(data["timings"]) == ["load", "encode", "denoise", "decode", "total"]
    assert data == trace.to_dict()


def test_trace_written_before_this_reader_existed_reads(tmp_path: Path) -> None:
    """A trace.json literally as the first TraceWriter wrote it (integer timestep, null sigma and delta)."""
    (tmp_path / "image.png").write_bytes(b"png")
    old = {"image": "image.png", "seed": 7, "request": {
        "prompt": "a red circle", "negative_prompt": "", "model": "tiny-shapes", "scheduler": None,
        "num_inference_steps": 1, "guidance_scale": 5.0, "seed": 7, "width": None, "height": None, "guidance": "cfg",
        "guidance_params": {}}, "scheduler": "dpmpp_2m", "family": "sd", "width": 64, "height": 64, "cancelled": False,
        "timings": {"load": 0.1, "encode": 0.0, "denoise": 0.2, "decode": 0.0, "total": 0.3},
        "preview_kinds": {}, "latent_format": "tiny-shapes",
        "steps": [{"step": 0, "timestep": 999, "sigma": None, "effective_scale": 5.0, "guidance_delta_norm": None,
                   "elapsed": 0.01, "previews": {}}]}
    (tmp_path / "trace.json").write_text(json.dumps(old))
    trace = Trace.read(tmp_path)
    assert trace.request.model == "tiny-shapes" and trace.steps[0].timestep == 999.0 and trace.steps[0].sigma is None
    assert trace.steps[0].num_steps == 1 and not trace.steps[0].kept  # num_steps: the steps recorded, then
    assert trace.to_dict() == old | {"steps": [old["steps"][0] | {"timestep": 999.0, "num_steps": 1}]}


def _set(data: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(data)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


_DELETE = object()

MALFORMED = [
    ((), [1, 2], "must hold a JSON object, got list"),
    ((), "x", "must hold a JSON object, got str"),
    ((), {"request": "x"}, "missing image, seed, scheduler"),
    (("request",), "x", "request must be a JSON object, got str"),
    (("request", "prompt"), 3, "invalid request: prompt must be a string"),
    (("request", "colour"), "red", "invalid request: .*unexpected keyword argument 'colour'"),
    (("request", "seed"), 12345, "request seed 12345 differs from the trace's seed"),
    (("steps",), _DELETE, "missing steps"),
    (("seed",), "7", "seed must be an integer"),
    (("width",), True, "width must be an integer"),
    (("cancelled",), 0, "cancelled must be true or false"),
    (("timings", "total"), _DELETE, "timings must have exactly load, encode, denoise, decode, total"),
    (("timings", "load"), "fast", "timings: load must be a number"),
    (("preview_kinds",), {"x0": 1}, "preview_kinds must map strings to strings"),
    (("steps",), {"0": {}}, "steps must be a JSON list"),
    (("steps", 0), 3, r"steps\[0\]: must be a JSON object"),
    (("steps", 1, "sigma"), "high", r"steps\[1\]: sigma must be a number or null"),
    (("steps", 2, "elapsed"), None, r"steps\[2\]: elapsed must be a number, got None"),
    (("steps", 0, "previews", "x0"), "../../etc/passwd", "preview 'x0' must be a path inside the run folder"),
    (("steps", 0, "previews", "x0"), "/etc/passwd", "preview 'x0' must be a path inside the run folder"),
    (("image",), "../image.png", "image must be a file name inside the run folder"),
    (("image",), "other.png", "image 'other.png'.* does not exist"),
]


@pytest.mark.parametrize(("path", "value", "message"), MALFORMED, ids=[m[2][:40] for m in MALFORMED])
def test_malformed_trace_is_a_clear_value_error(run, tmp_path: Path, path: tuple, value, message: str) -> None:
    folder = copy_run(run[0], tmp_path)
    data = json.loads((folder / "trace.json").read_text())
    (folder / "trace.json").write_text(json.dumps(value if path == () else _set(data, path, value)))
    with pytest.raises(ValueError, match=message) as e:
        Trace.read(folder)
    assert str(folder / "trace.json") in str(e.value)


def test_unreadable_json_and_missing_trace(run, tmp_path: Path) -> None:
    folder = copy_run(run[0], tmp_path)
    (folder / "trace.json").write_text('{"image": ')
    with pytest.raises(ValueError, match="not readable JSON"):
        Trace.read(folder)
    (folder / "trace.json").unlink()
    with pytest.raises(ValueError, match="trace.json does not exist"):
        Trace.read(folder)


def test_image_must_be_a_regular_file_not_a_link(run, tmp_path: Path) -> None:
    folder = copy_run(run[0], tmp_path)
    outside = tmp_path / "elsewhere.png"
    (folder / "image.png").rename(outside)
    with pytest.raises(ValueError, match="image.png does not exist"):
        Trace.read(folder)
    os.symlink(outside, folder / "image.png")
    with pytest.raises(ValueError, match="is a symbolic link"):
        Trace.read(folder)
    (folder / "image.png").unlink()
    (folder / "image.png").mkdir()
    with pytest.raises(ValueError, match="is not a regular file"):
        Trace.read(folder)


def test_symlinked_trace_json_is_refused(run, tmp_path: Path) -> None:
    folder = copy_run(run[0], tmp_path)
    real = tmp_path / "real-trace.json"
    (folder / "trace.json").rename(real)
    os.symlink(real, folder / "trace.json")
    with pytest.raises(ValueError, match="is a symbolic link"):
        Trace.read(folder)


# --- step tensors ------------------------------------------------------------------------------------------------


def test_writer_saves_first_image_fp16_tensors_of_every_step(run) -> None:
    folder, _, events, writer, _ = run
    assert writer.tensors_saved and (folder / STEP_TENSORS_FILE).is_file()
    from safetensors.torch import load_file

    flat = load_file(folder / STEP_TENSORS_FILE)  # the file: fp16 (C, h, w) per step and field
    assert all(t.dtype == torch.float16 and t.ndim == 3 for t in flat.values()) and len(flat) == 4 * len(events)
    loaded = load_step_tensors(folder, Trace.read(folder).steps)
    assert [s.step for s in loaded] == [e.step for e in events]
    for saved, event in zip(loaded, events):
        # the record as a StepRecorder keeps it: numbers from trace.json, first image (1, C, h, w) float32
        assert saved.numbers_only() == dataclasses.replace(event.numbers_only(), elapsed=saved.elapsed,
                                                           previews=saved.previews)
        for source in StepEvent.TENSORS:
            t = getattr(saved, source)
            assert t.dtype == torch.float32 and t.shape == getattr(event, source)[:1].shape
            torch.testing.assert_close(t, getattr(event, source)[:1].float(), rtol=1e-3, atol=1e-3)


def test_save_respects_the_limit_and_keeps_missing_cond_uncond(run, tmp_path: Path) -> None:
    events = run[2]
    per_step = 4 * events[0].latents[0].numel() * 2  # four fp16 tensors
    assert save_step_tensors(tmp_path, events, limit_bytes=len(events) * per_step - 1) is False
    assert not (tmp_path / STEP_TENSORS_FILE).exists()
    no_cfg = [dataclasses.replace(e, denoised_cond=None, denoised_uncond=None) for e in events]
    assert save_step_tensors(tmp_path, no_cfg, limit_bytes=len(events) * per_step // 2) is True
    loaded = load_step_tensors(tmp_path, [e.numbers_only() for e in events])
    assert all(s.denoised_cond is None and s.denoised_uncond is None for s in loaded)
    torch.testing.assert_close(loaded[-1].denoised, events[-1].denoised[:1].float(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match=r"holds steps \[0, 1, 2\], the trace records steps \[0, 1\]"):
        load_step_tensors(tmp_path, [e.numbers_only() for e in events[:2]])


def test_writer_over_the_limit_saves_nothing(tiny_loader, tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path, Previewer(tiny_loader.get("sd")), previews={}, tensors_limit_bytes=100)
    writer.finish(generate(request(), writer, loader=tiny_loader))
    assert writer.tensors_saved is False and not (tmp_path / STEP_TENSORS_FILE).exists()
    assert Trace.read(tmp_path).steps[0].previews == {}


def test_load_refuses_foreign_tensor_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="does not exist"):
        load_step_tensors(tmp_path, ())
    (tmp_path / "steps").mkdir()
    save_file({"weights": torch.zeros(2)}, tmp_path / STEP_TENSORS_FILE)
    with pytest.raises(ValueError, match="unexpected tensor 'weights'"):
        load_step_tensors(tmp_path, ())
    (tmp_path / STEP_TENSORS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_step_tensors(tmp_path, ())
