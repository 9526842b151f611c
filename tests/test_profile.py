"""One model profile (pipelines/profile.py), resolved once per loaded model and read by every entry point: the UI's
runs, the request builder behind the UI and the HTTP API, the CLI and the Explain lab get the same preview kinds,
recommended settings and thread count from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import explain
from pipelines.loading import ModelLoader
from pipelines.requests import build_request, missing_embedded, recommended
from pipelines.types import DEFAULT_MODEL
from pipelines.worker import GenerationWorker
from ui.state import Playground

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(missing_embedded(DEFAULT_MODEL) is not None, reason="embedded model not installed")


@pytest.fixture(scope="module")
def loader() -> ModelLoader:
    return ModelLoader(device="cpu")


def test_registry_settings_need_no_weights_and_the_profile_is_resolved_once(loader, tiny_loader):
    fresh = ModelLoader(device="cpu")
    rec = recommended(DEFAULT_MODEL, fresh)
    assert fresh.loaded(DEFAULT_MODEL) is None  # read from the registry, nothing loaded
    profile = loader.profile(DEFAULT_MODEL)
    assert profile.recommended == rec and loader.profile(DEFAULT_MODEL) is profile
    assert profile.previews.fast == "approx" and profile.latent_format.decoder_file
    assert set(profile.schedulers).isdisjoint(profile.refused)
    # A model outside the registry: the stock pipeline's own defaults, from its profile.
    assert recommended("sd", tiny_loader).num_inference_steps == 50  # StableDiffusionPipeline.__call__'s default


def test_every_entry_point_reads_the_same_profile(loader, tmp_path):
    profile = loader.profile(DEFAULT_MODEL)
    rec = profile.recommended
    side = profile.native_size
    expected_threads = loader.threads(DEFAULT_MODEL, None, None, serving=True, default=2).threads

    # The request builder (UI and HTTP API): unset values take the recommended settings.
    request = build_request(prompt="a red circle", model=DEFAULT_MODEL, loader=loader, num_inference_steps=-1,
                            guidance_scale=-1, guidance="", seed=3)
    assert (request.num_inference_steps, request.guidance_scale, request.scheduler, request.guidance,
            dict(request.guidance_params)) == (rec.num_inference_steps, rec.guidance_scale, rec.scheduler,
                                               rec.guidance, dict(rec.guidance_params))

    # The UI's runs: preview kinds from the profile's policy, the worker's thread count from the loader's choice.
    worker = GenerationWorker()
    worker.default_threads = 2
    playground = Playground(loader, [DEFAULT_MODEL], DEFAULT_MODEL, tmp_path / "ui", preview_interval=0.0, worker=worker)
    run = playground.start(request, "auto", session=None)
    assert run.done.wait(60) and run.error is None
    assert (run.latents_kind, run.x0_kind, run.live_x0_kind) == profile.previews.view_kinds("auto", side * side)
    assert worker.run(torch.get_num_threads) == expected_threads

    # The Explain lab: its x̂0 images as the profile says experiments decode, on the same worker setting.
    report = explain.finish(explain.jump(request, loader=loader, short_steps=[]))
    assert report.steps and explain._X0(request, loader).kind == profile.previews.experiment_x0(side * side)

    # The CLI: the same recommended settings, preview kinds and (measured outside a server) thread choice.
    out = tmp_path / "cli"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines", "generate", "--prompt", "a red circle", "--seed", "3",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    trace = json.loads((out / "trace.json").read_text())
    assert trace["preview_kinds"] == {"latents": profile.previews.kind("fast"), "x0": profile.previews.cli_x0()}
    assert profile.previews.cli_x0() == "approx"  # the embedded model's tiny preview decoder, not a VAE decode
    req = trace["request"]
    assert (req["num_inference_steps"], req["guidance_scale"], req["scheduler"], req["guidance"]) == (
        rec.num_inference_steps, rec.guidance_scale, rec.scheduler, rec.guidance)
    # Its process has torch's own count to choose from and measures again (pipelines/threads.py): one thread, or
    # all when they win by CLI_MARGIN. On two cores the embedded model is near a tie, so either can come out; in one
    # process the UI, the API and the Explain lab above all read the one measured count.
    found = re.search(r"on (\d+) threads?", proc.stdout)
    assert found and 1 <= int(found.group(1)) <= (os.cpu_count() or 1), proc.stdout
