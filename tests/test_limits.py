"""Safe as a public Space, the parts below the UI: the work budget in the one request builder (and so in the CLI),
Limits from the environment, bounded outputs (retention, orphans of killed runs), a history no file in outputs can
break, the hardware-aware model list, the loader that cannot thrash, and client-safe error messages."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.errors import client_message, scrub_paths
from pipelines.limits import DEFAULT_BUDGETS, ENV_VARS, Limits
from pipelines.loading import ModelLoader
from pipelines.outputs import TRACE_MAX_BYTES, Trace, TraceWriter, clean_orphans, prune_outputs, run_folders
from pipelines.registry import MODELS, offered_models, tier_of
from pipelines.requests import build_request
from pipelines.types import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent
BIG = "x" * 10_000_000  # a 10 MB prompt, as sent to the Space


@pytest.fixture(scope="module")
def loader():
    from tests.tiny import tiny_pipeline

    loader = ModelLoader(device="cpu", allowed=[DEFAULT_MODEL, "sd-turbo", "tiny-sd"])
    loader.add("tiny-sd", tiny_pipeline("sd"))
    return loader


# --- the work budget, through build_request ---------------------------------------------------------------------

# (keyword arguments over a valid tiny-shapes request, a regex the refusal must match: the limit or allowed values)
BAD_INPUTS = [
    ({"prompt": "x" * 2001}, r"prompt is 2001 characters; the limit is 2000 \(raise it with PLAYGROUND_MAX_PROMPT_CHARS\)"),
    ({"prompt": BIG}, r"prompt is 10000000 characters; the limit is 2000"),
    ({"prompt": 5}, r"prompt must be text, got int"),
    ({"prompt": ["a"]}, r"prompt must be text, got list"),
    ({"negative_prompt": "y" * 2001}, r"negative_prompt is 2001 characters; the limit is 2000 .*PLAYGROUND_MAX_PROMPT_CHARS"),
    ({"negative_prompt": {"a": 1}}, r"negative_prompt must be text, got dict"),
    ({"num_inference_steps": 0}, r"num_inference_steps must be a whole number from 1 to 1000, got 0"),
    ({"num_inference_steps": -5}, r"from 1 to 1000, got -5"),
    ({"num_inference_steps": 1001}, r"from 1 to 1000, got 1001"),
    ({"num_inference_steps": 1e20}, r"from 1 to 1000"),
    ({"num_inference_steps": 1.5}, r"num_inference_steps must be a whole number, got 1.5"),
    ({"num_inference_steps": "1.5"}, r"num_inference_steps must be a whole number, got '1.5'"),
    ({"num_inference_steps": "abc"}, r"num_inference_steps must be a whole number, got 'abc'"),
    ({"num_inference_steps": True}, r"num_inference_steps must be a whole number, got True"),
    ({"num_inference_steps": float("nan")}, r"num_inference_steps must be a whole number, got nan"),
    ({"num_inference_steps": float("inf")}, r"num_inference_steps must be a whole number, got inf"),
    ({"guidance_scale": 1e12}, r"guidance_scale must be from 0 to 100, got 1e\+12"),
    ({"guidance_scale": 1e308}, r"guidance_scale must be from 0 to 100, got 1e\+308"),
    ({"guidance_scale": "1e400"}, r"guidance_scale must be a finite number"),
    ({"guidance_scale": 100.5}, r"guidance_scale must be from 0 to 100, got 100.5"),
    ({"guidance_scale": -0.5}, r"guidance_scale must be from 0 to 100, got -0.5"),
    ({"guidance_scale": float("inf")}, r"guidance_scale must be a finite number"),
    ({"guidance_scale": "abc"}, r"guidance_scale must be a number, got 'abc'"),
    ({"guidance_scale": True}, r"guidance_scale must be a number, got True"),
    ({"seed": 1.5}, r"seed must be a whole number, got 1.5"),
    ({"seed": "1.5"}, r"seed must be a whole number, got '1.5'"),
    ({"seed": -5}, r"seed must be a whole number from 0 to 2\*\*63-1"),
    ({"seed": 2**63}, r"seed must be a whole number from 0 to 2\*\*63-1"),
    ({"seed": "9" * 300}, r"seed must be a whole number, got '9{10,}…$"),
    ({"seed": float("nan")}, r"seed must be a whole number, got nan"),
    ({"width": 33.3}, r"width must be a whole number, got 33.3"),
    ({"width": -8}, r"width must be a whole number from 1 to 4096 \(or 0 for the model's size\), got -8"),
    ({"height": 4097}, r"height must be a whole number from 1 to 4096"),
    ({"width": 1e9}, r"width must be a whole number from 1 to 4096"),
    ({"width": 512, "height": 512},
     r"512x512 is 262144 pixels; the limit for small models such as 'tiny-shapes' on a cpu is 65536 .*PLAYGROUND_MAX_PIXELS"),
    ({"width": 4096, "height": 64}, r"4096x64 is 262144 pixels; the limit .* is 65536"),
    ({"width": 256, "height": 256, "num_inference_steps": 100},
     r"256x256 x 100 steps is 6553600 pixel-steps; the limit .* is 4194304 \(at most 64 steps at this size; raise it "
     r"with PLAYGROUND_MAX_WORK\)"),
    ({"width": 128, "height": 128, "num_inference_steps": 1000}, r"pixel-steps; .*\(at most 256 steps at this size"),
    ({"model": "sd-turbo", "num_inference_steps": 51},
     r"from 1 to 50 for standard models such as 'sd-turbo' on a cpu, got 51 \(raise it with PLAYGROUND_MAX_STEPS"),
    ({"model": "sd-turbo", "width": 1024, "height": 1024, "num_inference_steps": 1}, r"limit .* 'sd-turbo' on a cpu is 262144"),
    ({"model": "sd-turbo", "num_inference_steps": 40}, r"512x512 x 40 steps .*\(at most 30 steps"),  # native size
    ({"model": ""}, r"model must be one of the offered models, got an empty value"),
    ({"model": "not-offered"}, r"model 'not-offered' is not offered here; choose one of: tiny-shapes, sd-turbo"),
    ({"model": "m" * 5000}, r"model must be one of the offered models, got 5000 characters"),
    ({"model": None}, r"model must be one of the offered models"),
    ({"scheduler": "s" * 200}, r"scheduler is 200 characters; the limit is 100"),
    ({"scheduler": 5}, r"scheduler must be a key \(text\), got int"),
    ({"guidance": "magic"}, r"unknown guidance method 'magic'; choose one of: cfg"),
    ({"guidance": 5}, r"guidance must be a key \(text\), got int"),
    ({"guidance_params": "[1]"}, r"guidance_params must be a JSON object"),
    ({"guidance_params": "[" * 100_000}, r"guidance_params must be at most 2000 characters of JSON"),
    ({"guidance_params": "[" * 1999}, r"guidance_params must be a JSON object"),
    ({"guidance": "rescale", "guidance_params": '{"guidance_rescale": "x"}'}, r"guidance parameter 'guidance_rescale' must be a number"),
    ({"guidance": "rescale", "guidance_params": '{"guidance_rescale": 2}'}, r"guidance_rescale must be in \[0, 1\], got 2"),
    ({"guidance": "rescale", "guidance_params": '{"guidance_rescale": 1e400}'}, r"must be a finite number"),
    ({"guidance_params": '{"nope": 1}'}, r"guidance method 'cfg' has no parameter 'nope'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS, ids=[f"{i}-{m[:30]}" for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_with_its_limit(loader, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        build_request(**({"prompt": "a red circle", "model": DEFAULT_MODEL, "loader": loader} | kwargs))
    text = client_message(e.value)
    assert "\n" not in text and len(text) <= 300 and str(ROOT) not in text  # short, one line, no server path


def test_at_the_limits_is_accepted(loader):
    """The edges of each budget are served, so the refusals above are the limits and nothing stricter."""
    ok = dict(prompt="p" * 2000, negative_prompt="n" * 2000, model=DEFAULT_MODEL, loader=loader)
    assert build_request(**ok, num_inference_steps=1000).num_inference_steps == 1000  # 64² × 1000 fits 2**22
    assert build_request(**ok, width=256, height=256, num_inference_steps=64).width == 256
    assert build_request(**ok, guidance_scale=100, seed=2**63 - 1).guidance_scale == 100
    assert build_request(**ok, num_inference_steps="20", seed=7.0).seed == 7
    assert build_request(prompt="x", model="sd-turbo", loader=loader, num_inference_steps=30).width is None


def test_limits_raise_and_lower_the_budget(loader):
    base = dict(prompt="a red circle", model=DEFAULT_MODEL, loader=loader)
    with pytest.raises(ValueError, match="the limit is 5 .*PLAYGROUND_MAX_PROMPT_CHARS"):
        build_request(**base, limits=Limits(max_prompt_chars=5))
    r = build_request(**base, width=512, height=512, num_inference_steps=2,
                      limits=Limits(max_pixels=512 * 512, max_work=512 * 512 * 2))
    assert (r.width, r.height) == (512, 512)
    with pytest.raises(ValueError, match="from 1 to 10 for small models"):
        build_request(**base, num_inference_steps=11, limits=Limits(max_steps=10))
    with pytest.raises(ValueError, match="from 1 to 1000"):  # the request type's own bound still holds
        build_request(**base, num_inference_steps=1001, limits=Limits(max_steps=5000, max_work=2**40))


def test_budgets_follow_tier_and_device():
    limits = Limits()
    assert limits.budget("small", "cpu") == DEFAULT_BUDGETS[("small", "cpu")]
    assert limits.budget("heavy", "cuda").max_pixels > limits.budget("heavy", "cpu").max_pixels
    assert limits.budget("standard", "mps") == DEFAULT_BUDGETS[("standard", "cpu")]  # not CUDA: the CPU budget
    assert Limits(max_pixels=10).budget("heavy", "cuda").max_pixels == 10
    with pytest.raises(ValueError, match="unknown model tier 'giant'; choose one of: small, standard, heavy"):
        limits.budget("giant", "cpu")


# --- Limits from the environment ----------------------------------------------------------------------------------


def test_limits_from_env_reads_every_variable():
    env = {"PLAYGROUND_MAX_PIXELS": "1048576", "PLAYGROUND_MAX_STEPS": "50", "PLAYGROUND_MAX_WORK": " 1000000 ",
           "PLAYGROUND_MAX_PROMPT_CHARS": "500", "PLAYGROUND_MAX_RUN_SECONDS": "30.5", "PLAYGROUND_MAX_RUNS_KEPT": "10",
           "PLAYGROUND_MAX_OUTPUT_MB": "0.5", "PLAYGROUND_ALLOW_HEAVY_MODELS": "yes",
           "PLAYGROUND_MODEL_SWITCH_SECONDS": "60", "UNRELATED": "x"}
    assert set(ENV_VARS.values()) <= set(env)
    limits = Limits.from_env(env)
    assert limits == Limits(max_pixels=1048576, max_steps=50, max_work=1000000, max_prompt_chars=500,
                            max_run_seconds=30.5, max_runs_kept=10, max_output_mb=0.5, allow_heavy_models=True,
                            model_switch_seconds=60)
    assert limits.max_output_bytes == 2**19
    assert Limits.from_env({}) == Limits() and Limits.from_env({"PLAYGROUND_MAX_PIXELS": ""}) == Limits()
    assert Limits.from_env({"PLAYGROUND_ALLOW_HEAVY_MODELS": "auto"}).allow_heavy_models is None


@pytest.mark.parametrize("var, value, message", [
    ("PLAYGROUND_MAX_PIXELS", "abc", "PLAYGROUND_MAX_PIXELS must be a whole number >= 1, got 'abc'"),
    ("PLAYGROUND_MAX_PIXELS", "0", r"max_pixels \(PLAYGROUND_MAX_PIXELS\) must be a whole number >= 1"),
    ("PLAYGROUND_MAX_STEPS", "1.5", "PLAYGROUND_MAX_STEPS must be a whole number"),
    ("PLAYGROUND_MAX_WORK", "-3", "PLAYGROUND_MAX_WORK.* must be a whole number >= 1"),
    ("PLAYGROUND_MAX_PROMPT_CHARS", "0", "PLAYGROUND_MAX_PROMPT_CHARS.* must be a whole number >= 1"),
    ("PLAYGROUND_MAX_RUN_SECONDS", "-1", r"PLAYGROUND_MAX_RUN_SECONDS\) must be a finite number > 0"),
    ("PLAYGROUND_MAX_RUN_SECONDS", "inf", "PLAYGROUND_MAX_RUN_SECONDS.* finite"),
    ("PLAYGROUND_MAX_RUNS_KEPT", "many", "PLAYGROUND_MAX_RUNS_KEPT must be a whole number"),
    ("PLAYGROUND_MAX_OUTPUT_MB", "nan", "PLAYGROUND_MAX_OUTPUT_MB.* finite"),
    ("PLAYGROUND_ALLOW_HEAVY_MODELS", "maybe", "PLAYGROUND_ALLOW_HEAVY_MODELS must be 1/true/yes, 0/false/no or auto"),
    ("PLAYGROUND_MODEL_SWITCH_SECONDS", "-1", "PLAYGROUND_MODEL_SWITCH_SECONDS.* >= 0"),
])
def test_invalid_environment_is_a_clear_startup_error(var, value, message):
    with pytest.raises(ValueError, match=message):
        Limits.from_env({var: value})


# --- the CLI refuses the same requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--prompt", "x" * 2001], "prompt is 2001 characters; the limit is 2000 (raise it with PLAYGROUND_MAX_PROMPT_CHARS)"),
    (["--width", "512", "--height", "512"], "512x512 is 262144 pixels; the limit for small models such as 'tiny-shapes'"),
    (["--width", "256", "--height", "256", "--steps", "100"], "at most 64 steps at this size; raise it with PLAYGROUND_MAX_WORK"),
    (["--guidance-scale", "1e308"], "guidance_scale must be from 0 to 100, got 1e+308"),
    (["--negative-prompt", "n" * 3000], "negative_prompt is 3000 characters"),
])
def test_cli_refuses_the_same(tmp_path, capsys, args, expected):
    from pipelines.__main__ import main

    argv = ["generate", "--prompt", "a red circle", "--out", str(tmp_path / "o"), "--device", "cpu"]
    code = main(argv + args)  # later flags win: the bad value replaces the good one
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "o").exists()


def test_cli_reads_its_limits_from_the_environment(tmp_path, capsys, monkeypatch):
    """main() (what `python -m pipelines` runs) with PLAYGROUND_MAX_PROMPT_CHARS in its environment; in this process
    to spare a subprocess's ~5 s of imports (tests/test_cli.py runs the real process's refusals)."""
    from pipelines.__main__ import main

    monkeypatch.setenv("PLAYGROUND_MAX_PROMPT_CHARS", "5")
    code = main(["generate", "--prompt", "a red circle", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err  # an exception instead of a status would fail the call itself
    assert "error: prompt is 12 characters; the limit is 5 (raise it with PLAYGROUND_MAX_PROMPT_CHARS)" in err


def test_cli_refuses_fractional_steps_and_seed(tmp_path, capsys):
    from pipelines.__main__ import main

    for flag in ("--steps", "--seed"):
        with pytest.raises(SystemExit) as e:  # argparse's int type: the run never starts
            main(["generate", "--prompt", "x", "--out", str(tmp_path / "o"), flag, "1.5"])
        assert e.value.code == 2 and "invalid int value: '1.5'" in capsys.readouterr().err


# --- bounded outputs: retention -----------------------------------------------------------------------------------


def fake_run(outputs: Path, name: str, mtime: float, size: int = 1000, finished: bool = True) -> Path:
    """A run folder as TraceWriter leaves it (content need not parse: retention looks at files, not JSON)."""
    folder = outputs / name
    (folder / "steps").mkdir(parents=True)
    (folder / "steps" / "000_x0.png").write_bytes(b"p" * size)
    (folder / "image.png").write_bytes(b"i" * 100)
    if finished:
        (folder / "trace.json").write_text("{}")
        os.utime(folder / "trace.json", (mtime, mtime))
    for p in (folder / "steps" / "000_x0.png", folder / "image.png", folder / "steps"):
        os.utime(p, (mtime, mtime))
    return folder


def real_run(loader, outputs: Path, name: str, seed: int) -> Path:
    from pipelines.generate import generate
    from pipelines.previews import Previewer
    from pipelines.types import GenerationRequest

    folder = outputs / name
    writer = TraceWriter(folder, Previewer(loader.get("tiny-sd")), tensors_limit_bytes=2**20)
    request = GenerationRequest(prompt="a red circle", model="tiny-sd", num_inference_steps=2, seed=seed,
                                scheduler="euler", guidance_scale=3.0)
    writer.finish(generate(request, writer, loader=loader))
    return folder


def test_retention_keeps_the_newest_runs_within_count_and_bytes(loader, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    now = time.time()
    fakes = [fake_run(outputs, f"run-{i:03d}", now - 1000 + i) for i in range(30)]
    reals = [real_run(loader, outputs, f"real-{i}", seed=i) for i in range(2)]  # newest: written now
    # Things that are not run folders: never removed, never followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    target = fake_run(tmp_path, "outside-run", now - 5000)  # an old run outside, reachable through a link
    os.symlink(target, outputs / "a-link-to-a-run")
    os.symlink(elsewhere, outputs / "a-link-to-a-folder")
    sweep = outputs / "sweep"
    sweep.mkdir()
    (sweep / "grid.png").write_bytes(b"g")
    (outputs / "notes.txt").write_text("mine")
    unfinished = fake_run(outputs, "in-flight", now - 2000, finished=False)  # older than all, but maybe running

    removed = prune_outputs(outputs, Limits(max_runs_kept=10))
    kept = [r.path.name for r in run_folders(outputs) if r.finished]
    assert len(removed) == 22 and kept == [f"run-{i:03d}" for i in range(22, 30)] + ["real-0", "real-1"]
    assert all(not f.exists() for f in fakes[:22]) and all(Trace.read(f) for f in reals)
    assert target.is_dir() and (target / "trace.json").is_file() and (elsewhere / "precious.txt").read_text() == "keep me"
    assert (outputs / "a-link-to-a-run").is_symlink() and (sweep / "grid.png").exists() and (outputs / "notes.txt").exists()
    assert unfinished.is_dir()

    # Bytes: 1.5 MB of fakes (each ~0.3 MB) under a 0.5 MB cap; `keep` protects a run on screen.
    big = [fake_run(outputs, f"big-{i}", now + i, size=300_000) for i in range(5)]
    prune_outputs(outputs, Limits(max_output_mb=0.5, max_runs_kept=100), keep=[big[0]])
    finished = [r for r in run_folders(outputs) if r.finished and r.path != big[0]]
    assert sum(r.size for r in finished) <= 2**19 and [r.path.name for r in finished] == ["big-4"]
    assert big[0].is_dir() and not big[3].exists()

    # Over many rounds the folder stays bounded (the newest run always stays, whatever its size).
    for i in range(20):
        fake_run(outputs, f"round-{i:02d}", now + 100 + i, size=50_000)
        prune_outputs(outputs, Limits(max_runs_kept=3))
        assert len([r for r in run_folders(outputs) if r.finished]) == 3
    assert [r.path.name for r in run_folders(outputs) if r.finished] == ["round-17", "round-18", "round-19"]


def test_prune_never_removes_the_newest_run(tmp_path):
    only = fake_run(tmp_path, "only", time.time(), size=3 * 2**20)
    assert prune_outputs(tmp_path, Limits(max_output_mb=1, max_runs_kept=1)) == [] and only.is_dir()


# --- orphans of killed runs ---------------------------------------------------------------------------------------


def test_killed_cli_run_leaves_nothing_history_shows_and_is_cleaned(loader, tmp_path):
    """SIGKILL a real `python -m pipelines generate` mid-run: history shows only finished runs, clean_orphans removes
    what the killed one left, and the finished run survives it."""
    from ui.history import history

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    done = real_run(loader, outputs, "done", seed=5)
    killed = outputs / "killed"
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "generate", "--prompt", "a red circle", "--steps", "1000",
                             "--seed", "1", "--out", str(killed), "--device", "cpu"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list((killed / "steps").glob("*.png"))) < 4:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert len(list((killed / "steps").glob("*.png"))) >= 4 and not (killed / "trace.json").exists()
    (killed / ".image.png.abc123.tmp").write_bytes(b"half")  # what an atomic write killed before its rename leaves
    assert [Path(f).name for f, _ in history(outputs)] == ["done"]  # the killed run is never shown

    removed = clean_orphans(outputs)
    assert removed == [killed] and not killed.exists()
    assert [p.name for p in outputs.iterdir()] == ["done"] and [Path(f).name for f, _ in history(outputs)] == ["done"]
    assert Trace.read(done).seed == 5


def test_clean_orphans_keeps_finished_runs_and_foreign_things(tmp_path):
    now = time.time()
    finished = fake_run(tmp_path, "finished", now - 50)
    (finished / ".trace.json.x1.tmp").write_text("{")
    (finished / "steps" / ".003_x0.png.y2.tmp").write_bytes(b"p")
    orphan = fake_run(tmp_path, "orphan", now - 50, finished=False)
    fresh = fake_run(tmp_path, "fresh", now, finished=False)
    half_removed = fake_run(tmp_path, ".deleting-gone", now - 50)
    foreign = tmp_path / "foreign"
    (foreign / "steps").mkdir(parents=True)
    (foreign / "steps" / "000_x0.png").write_bytes(b"p")
    (foreign / "README").write_text("not a run")
    (tmp_path / "empty").mkdir()
    link_target = fake_run(tmp_path / "x", "target-orphan", now - 50, finished=False)
    os.symlink(link_target, tmp_path / "linked-orphan")
    precious = tmp_path / "x" / "precious.png"
    precious.write_bytes(b"mine")
    with_link = fake_run(tmp_path, "orphan-with-a-link", now - 50, finished=False)
    (with_link / "image.png").unlink()
    os.symlink(precious, with_link / "image.png")

    removed = clean_orphans(tmp_path, older_than=10)
    assert set(removed) == {orphan, half_removed, finished / ".trace.json.x1.tmp", finished / "steps" / ".003_x0.png.y2.tmp"}
    assert finished.is_dir() and (finished / "trace.json").is_file() and fresh.is_dir()
    assert (foreign / "README").exists() and (tmp_path / "empty").is_dir() and link_target.is_dir()
    assert (with_link / "image.png").is_symlink() and precious.read_bytes() == b"mine"


# --- history: no file in outputs breaks it -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_run(loader, tmp_path_factory) -> Path:
    return real_run(loader, tmp_path_factory.mktemp("good"), "good", seed=3)


def _good_trace(good_run: Path) -> dict:
    return json.loads((good_run / "trace.json").read_text())


def _write(folder: Path, trace, image: bool = True) -> None:
    folder.mkdir()
    if image:
        (folder / "image.png").write_bytes(b"png")
    (folder / "trace.json").write_text(trace if isinstance(trace, str) else json.dumps(trace))


MALFORMED_RUNS = {
    "request-is-a-string": lambda f, t: _write(f, t | {"request": "x"}),
    "prompt-not-a-string": lambda f, t: _write(f, t | {"request": t["request"] | {"prompt": 5}}),
    "request-null": lambda f, t: _write(f, t | {"request": None}),
    "request-unknown-field": lambda f, t: _write(f, t | {"request": t["request"] | {"evil": 1}}),
    "guidance-scale-huge-int": lambda f, t: _write(f, t | {"request": t["request"] | {"guidance_scale": 10**400}}),
    "timings-huge-int": lambda f, t: _write(f, t | {"timings": t["timings"] | {"load": 10**400}}),
    "steps-not-a-list": lambda f, t: _write(f, t | {"steps": {"0": 1}}),
    "a-json-list": lambda f, t: _write(f, [t]),
    "empty-object": lambda f, t: _write(f, {}),
    "binary-junk": lambda f, t: (f.mkdir(), (f / "image.png").write_bytes(b"png"),
                                 (f / "trace.json").write_bytes(bytes(range(256)) * 8)),
    "nested-thousands-deep": lambda f, t: _write(f, "[" * 200_000 + "]" * 200_000),
    "huge-file": lambda f, t: _write(f, json.dumps(t | {"pad": "x" * (TRACE_MAX_BYTES + 10)})),
    "trace-is-a-directory": lambda f, t: (f.mkdir(), (f / "image.png").write_bytes(b"png"), (f / "trace.json").mkdir()),
    "image-missing": lambda f, t: _write(f, t, image=False),
    "image-symlinked": lambda f, t: (_write(f, t, image=False), os.symlink(f.parent / "good" / "image.png", f / "image.png")),
    "trace-symlinked": lambda f, t: (f.mkdir(), (f / "image.png").write_bytes(b"png"),
                                     os.symlink(f.parent / "good" / "trace.json", f / "trace.json")),
    "image-name-escapes": lambda f, t: _write(f, t | {"image": "../good/image.png"}),
    "image-name-nul": lambda f, t: _write(f, t | {"image": "im\u0000age.png"}),
    "seed-mismatch": lambda f, t: _write(f, t | {"seed": t["seed"] + 1}),
}


@pytest.mark.parametrize("name", list(MALFORMED_RUNS))
def test_malformed_run_is_a_value_error(good_run, tmp_path, name):
    shutil_copy(good_run, tmp_path / "good")
    MALFORMED_RUNS[name](tmp_path / name, _good_trace(good_run))
    with pytest.raises(ValueError):
        Trace.read(tmp_path / name)


def shutil_copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_history_skips_every_malformed_run_and_logs_it(good_run, tmp_path, caplog):
    from ui.history import history

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    shutil_copy(good_run, outputs / "good")
    for name, make in MALFORMED_RUNS.items():
        make(outputs / name, _good_trace(good_run))
    os.symlink(outputs / "good", outputs / "linked-run-folder")  # a whole run folder through a link
    (outputs / "a-file").write_text("junk")
    (outputs / ".hidden").mkdir()
    with caplog.at_level(logging.INFO, logger="playground"):
        items = history(outputs)
    assert [Path(f).name for f, _ in items] == ["good"]
    skipped = {r.getMessage().split()[2].rstrip(":") for r in caplog.records if "history skips" in r.getMessage()}
    assert skipped == set(MALFORMED_RUNS) | {"linked-run-folder"}
    assert history(tmp_path / "missing") == [] and history(outputs / "a-file") == []


# --- models: the hardware-aware list and a loader that cannot thrash ----------------------------------------------


def test_heavy_models_are_not_offered_on_a_cpu_by_default():
    heavy = {k for k, m in MODELS.items() if m.tier == "heavy"}
    assert heavy == {"sdxl-base", "pixart-sigma-512", "sd3.5-medium", "flux.1-schnell", "flux.1-dev"}
    cpu = offered_models("cpu", Limits().heavy_allowed("cpu"), extra=["my/extra"])
    assert cpu == ["tiny-shapes", "sd-turbo", "sd-1.5", "my/extra"]
    assert set(offered_models("cuda", Limits().heavy_allowed("cuda"))) == set(MODELS)
    assert set(offered_models("cpu", Limits(allow_heavy_models=True).heavy_allowed("cpu"))) == set(MODELS)
    assert "sdxl-base" not in offered_models("cuda", Limits(allow_heavy_models=False).heavy_allowed("cuda"))


def test_tier_of_unknown_models_is_measured(loader):
    assert tier_of("tiny-sd", loader.get("tiny-sd")) == "small" and tier_of("unknown/model") == "heavy"
    assert tier_of(DEFAULT_MODEL) == "small" and tier_of("sd-1.5") == "standard"


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory) -> tuple[str, str]:
    from tests.tiny import tiny_pipeline

    out = []
    for name in ("a", "b"):
        path = tmp_path_factory.mktemp(f"model-{name}")
        tiny_pipeline("sd").save_pretrained(path)
        out.append(str(path))
    return out[0], out[1]


def test_model_switch_cooldown_refuses_thrashing(two_folders):
    a, b = two_folders
    cool = ModelLoader(device="cpu", switch_cooldown=3600)
    pipe_a = cool.get(a)
    with pytest.raises(ValueError, match=r"changes models at most every 3600 s \(PLAYGROUND_MODEL_SWITCH_SECONDS\); try"):
        cool.get(b)
    with pytest.raises(ValueError, match="changes models at most"):  # and build_request refuses before queueing
        build_request(prompt="x", model=b, loader=cool)
    assert cool.get(a) is pipe_a and cool.loaded(b) is None

    free = ModelLoader(device="cpu")
    free.get(a)
    with pytest.raises(ValueError, match="no such folder"):  # a model that cannot load evicts nothing
        free.get(str(Path(a) / "missing"))
    assert free.loaded(a) is not None
    free.get(b)
    assert free.loaded(a) is None and free.loaded(b) is not None and len(free._pipes) == 1


# --- client-safe messages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error, expected", [
    (ValueError("[Errno 30] Read-only file system: '{out}/20260101-abc'"), "Read-only file system: 'outputs/20260101-abc'"),
    (ValueError(f"cannot read {ROOT}/assets/models/tiny-shapes/x.json"), "cannot read <app>/assets/models/tiny-shapes/x.json"),
    (ValueError(f"not in the cache ({os.path.expanduser('~')}/.cache/huggingface/hub)"), "not in the cache (~/.cache/huggingface/hub)"),
    (ValueError("bad file /srv/secret/place/file.bin"), "bad file …/file.bin"),
    (ValueError("two\nlines   here."), "two lines here"),
    (OSError(30, "Read-only file system", "/srv/outputs/x"), "the server could not read or write its files (Read-only file system)"),
    (MemoryError(), "ran out of memory"),
    (RuntimeError(f"mat1 and mat2 shapes cannot be multiplied in {sys.prefix}/lib/torch/x.py"), "internal error (RuntimeError)"),
    (KeyError("unet"), "internal error (KeyError)"),
])
def test_client_message_has_no_server_paths_or_internals(tmp_path, error, expected):
    out = tmp_path / "outputs"
    if isinstance(error, ValueError):
        error = ValueError(str(error).replace("{out}", str(out)))
    text = client_message(error, out)
    assert expected in text and "\n" not in text and str(tmp_path) not in text and str(ROOT) not in text
    assert "/srv" not in text and "mat1" not in text and sys.prefix not in text


def test_scrub_leaves_relative_paths_and_fractions():
    assert scrub_paths("ratio 1/2 of a/b/c") == "ratio 1/2 of a/b/c"
