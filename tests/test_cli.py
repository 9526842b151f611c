"""The CLI on a saved tiny model folder: its behaviour through main(argv) in this process (the function
`python -m pipelines` runs), the process itself (`python -m pipelines ...`: imports, exit statuses, no traceback) in a
few real subprocesses, which pay ~5 s of imports each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.__main__ import build_parser, main
from tests.tiny import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


def cli_env() -> dict[str, str]:
    # As from a user's shell: importing pipelines.__main__ here set TRANSFORMERS_VERBOSITY, which the CLI sets itself.
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


class Started:
    """`python -m pipelines ARGS` as from a user's shell, started now; result() waits for it."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines", *args], cwd=ROOT, env=cli_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out = Path(args[args.index("--out") + 1]) if "--out" in args else None  # the folder it writes
        self._done: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        if self._done is None:
            out, err = self.proc.communicate(timeout=300)
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._done


@pytest.fixture(autouse=True)
def torch_threads():
    """main() sets torch's thread count for the model it runs (as the CLI process should); the suite's stays one."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline("sd").save_pretrained(path)
    return path


REFUSED_IN_A_PROCESS = (["--out", "/etc/passwd"], ["--out", "/tmp", "--device", "cpu; rm -rf /"])


@pytest.fixture(scope="module", autouse=True)
def real_runs(model_dir, tmp_path_factory) -> dict[str, Started]:
    """This module's real `python -m pipelines` processes, all started with its first test: each pays ~5 s of
    imports, which overlap one another and the in-process tests; a test that reads one waits for it."""
    out = tmp_path_factory.mktemp("real")
    runs = {  # width and height: multiples of 8
        "generate": Started("generate", "--prompt", "a red circle", "--negative-prompt", "blue", "--model",
                            str(model_dir), "--scheduler", "euler_a", "--steps", "3", "--guidance-scale", "6",
                            "--seed", "11", "--width", "40", "--height", "24", "--out", str(out / "run")),
        "steps": Started("generate", "--prompt", "x", "--model", str(model_dir), "--steps", "5000", "--out",
                         str(out / "steps")),
        **{" ".join(args): Started("generate", "--prompt", "x", "--model", str(out / "no-model"), *args)
           for args in REFUSED_IN_A_PROCESS},
    }
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.communicate()


def test_generate_writes_image_trace_and_steps(real_runs):
    out = real_runs["generate"].out
    proc = real_runs["generate"].result()
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out / "image.png")
    assert image.size == (40, 24)
    params = image.text["parameters"]
    assert params.splitlines()[0] == "a red circle"
    assert params.splitlines()[1] == "Negative prompt: blue"
    assert "Steps: 3, Sampler: Euler a, CFG scale: 6, Seed: 11, Size: 40x24" in params.splitlines()[2]
    request = json.loads(image.text["request"])
    assert request["seed"] == 11 and request["scheduler"] == "euler_a" and request["negative_prompt"] == "blue"
    trace = json.loads((out / "trace.json").read_text())
    assert [s["step"] for s in trace["steps"]] == [0, 1, 2]
    for s in trace["steps"]:
        assert s["timestep"] > 0 and s["sigma"] > 0 and s["effective_scale"] == 6.0 and s["guidance_delta_norm"] > 0
        for rel in s["previews"].values():
            assert Image.open(out / rel).size == (40, 24)
        assert set(s["previews"]) == {"latents", "x0"}


def test_guidance_method_and_params_reach_the_trace(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["generate", "--prompt", "a star", "--model", str(model_dir), "--steps", "4", "--seed", "1",
                 "--width", "16", "--height", "16", "--guidance", "interval",
                 "--guidance-param", "start=0.5", "--guidance-param", "sigma_hi=1000", "--guidance-param", "sigma_lo=0",
                 "--scheduler", "euler", "--x0-preview", "none",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    steps = json.loads((out / "trace.json").read_text())["steps"]
    assert [s["effective_scale"] for s in steps[:2]] == [1.0, 1.0]  # outside the window: cond only
    assert all(s["guidance_delta_norm"] is None for s in steps[:2])
    assert all(s["effective_scale"] == 7.5 for s in steps[2:])
    assert "Guidance: interval" in Image.open(out / "image.png").text["parameters"]


@pytest.mark.parametrize("args,expected", [
    (["--steps", "0"], "num_inference_steps must be a whole number from 1 to 1000"),
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    (["--guidance-scale", "-2"], "guidance_scale must be from 0 to 100"),  # -1 = recommended, as in the API
    (["--width", "36"], "not a multiple of 8"),
    (["--scheduler", "warp"], "unknown scheduler 'warp'; valid for this model: ddim"),
    (["--scheduler", "flow_euler"], "valid for this model: ddim"),
    (["--guidance", "magic"], "unknown guidance method 'magic'; choose one of: cfg"),
    (["--guidance", "rescale", "--guidance-param", "guidance_rescale=1.5"], "must be in [0"),
])
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, args, expected):
    # In-process (the same main() the module runs) to keep the suite fast; one subprocess case follows.
    code = main(["generate", "--prompt", "x", "--model", str(model_dir), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "o" / "image.png").exists()


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot create files in: mode 0555, or for root (whom modes do not stop) immutable."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    try:
        locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    except FileNotFoundError:
        locked = False
    if not locked:
        pytest.skip("root without chattr +i on this filesystem: no folder is unwritable to it")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


REFUSED_UP_FRONT = [  # (argv after the request flags, the text the error line holds)
    (["--out", "/etc/passwd"], "--out '/etc/passwd' is a file, not a folder"),
    (["--out", "/etc/passwd/run"], "goes through '/etc/passwd', a file, not a folder"),
    (["--out", "/proc/foo"], "--out '/proc/foo' is under /proc, a kernel filesystem"),
    (["--out", "/sys/kernel/run"], "is under /sys, a kernel filesystem"),
    (["--out", "UNWRITABLE"], "cannot be written"),
    (["--device", "cuda"], "--device 'cuda' is not available with this torch build"),
    (["--device", "cuda:99"], "--device 'cuda:99' is not available"),
    (["--device", "cpu; rm -rf /"], "--device 'cpu; rm -rf /' is not a device: a device is cpu, cuda, cuda:N or mps"),
    (["--device", "gpu"], "is not a device: a device is cpu, cuda, cuda:N or mps"),
    (["--device", ""], "is not a device"),
]


@pytest.mark.parametrize("command", ["generate", "jump"])
@pytest.mark.parametrize("args,expected", REFUSED_UP_FRONT, ids=[" ".join(a) for a, _ in REFUSED_UP_FRONT])
def test_out_and_device_are_refused_before_the_model_loads(tmp_path, capsys, request, command, args, expected):
    """One line, status 2. The model folder does not exist: were --out and --device checked after loading, the line
    would be about the model."""
    if args[0] == "--device" and args[1].startswith("cuda") and torch.cuda.device_count() > int(args[1][5:] or 0):
        pytest.skip(f"{args[1]} exists on this machine")
    if "UNWRITABLE" in args:
        args = ["--out", str(request.getfixturevalue("unwritable"))]
    flags = {"--out": str(tmp_path / "o"), "--model": str(tmp_path / "no-model")} | dict(zip(args[::2], args[1::2]))
    code = main([command, "--prompt", "x", *(item for pair in flags.items() for item in pair)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line and "no-model" not in line, line


def test_refusals_in_a_real_process_exit_2_without_a_traceback(real_runs):
    """The process's own exit status and stderr, for a refusal after the model loads (bad steps) and for two before
    it (--out, --device: one line, library notices at import such as transformers' "requires torchvision"
    included). main()'s messages for every refusal are tested in-process above and below."""
    steps, out, device = (real_runs[key].result() for key in ["steps", *(" ".join(a) for a in REFUSED_IN_A_PROCESS)])
    assert steps.returncode == 2 and "Traceback" not in steps.stderr
    assert "error: num_inference_steps must be a whole number from 1 to 1000, got 5000" in steps.stderr
    for proc in (out, device):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        one_error_line(proc.stderr)


def test_non_finite_latents_exit_3_naming_the_step(model_dir, tmp_path, capsys):
    """The saved tiny SD model's PNDM config names 'leading' spacing with steps_offset=1, from which DPM++ 2M at 1000
    steps puts every step on t = 1 (and at 999 starts at t = 1000): NaN at step 2. One line with the step, the
    scheduler and what to try (998 steps: checked on the schedule), status 3, no image."""
    code = main(["generate", "--prompt", "a red circle", "--model", str(model_dir), "--scheduler", "dpmpp_2m",
                 "--steps", "1000", "--guidance-scale", "1", "--width", "16", "--height", "16", "--seed", "0",
                 "--x0-preview", "none", "--latents-preview", "none", "--out", str(tmp_path)])
    assert code == 3
    line = one_error_line(capsys.readouterr().err)
    assert "step 2 of 1000 with scheduler 'dpmpp_2m' (its schedule repeats timestep 1 there)" in line, line
    assert line.endswith("try 998 steps or another scheduler such as euler"), line
    assert not (tmp_path / "image.png").exists() and not (tmp_path / "trace.json").exists()


def test_help_documents_the_exit_statuses():
    text = build_parser().format_help()
    assert "exit status: 0 done; 1 files could not be read or written; 2 refused" in " ".join(text.split())


def test_unknown_model_folder_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--prompt", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "no such folder" in err  # an exception would fail the call


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's --help ends the process with status 0
        main(["generate", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--prompt", "--negative-prompt", "--model", "--scheduler", "--steps", "--guidance-scale", "--seed",
                 "--width", "--height", "--out", "--guidance", "--guidance-param"):
        assert flag in out


def test_listings(capsys):
    assert main(["guidance"]) == 0
    guidance = capsys.readouterr().out
    for key in ("cfg", "rescale", "interval", "apg", "cfg_zero_star", "guidance_rescale", "arXiv"):
        assert key in guidance
    assert main(["schedulers"]) == 0
    schedulers = capsys.readouterr().out
    for key in ("ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc",
                "lcm", "flow_euler"):
        assert key in schedulers


def test_sweep_writes_a_grid_with_one_image_per_scale(model_dir, tmp_path, capsys):
    # The old one-axis flag still works: --guidance-scales is --x guidance_scale=...
    code = main(["sweep", "--prompt", "a red circle", "--model", str(model_dir), "--steps", "2", "--seed", "4",
                 "--width", "16", "--height", "16", "--guidance-scales", "1,4", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["x"] == {"name": "guidance_scale", "values": [1.0, 4.0]} and data["y"] is None
    one, four = (Image.open(tmp_path / c["image"]) for c in data["cells"])
    assert "CFG scale: 1, Seed: 4" in one.text["parameters"] and "CFG scale: 4, Seed: 4" in four.text["parameters"]
    assert one.tobytes() != four.tobytes()
    assert Image.open(tmp_path / "grid.png").width > 2 * 16


def test_sweep_two_axes_cells_in_order(model_dir, tmp_path, capsys):
    code = main(["sweep", "--prompt", "a red circle", "--model", str(model_dir), "--seed", "4", "--width", "16",
                 "--height", "16", "--x", "guidance=cfg,rescale", "--y", "steps=1,2", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    cells = json.loads((tmp_path / "sweep.json").read_text())["cells"]
    assert [(c["x"], c["y"]) for c in cells] == [("cfg", 1), ("rescale", 1), ("cfg", 2), ("rescale", 2)]
    assert [c["settings"] for c in cells][1] == {"guidance": "rescale", "num_inference_steps": 1}
    assert {c["seed"] for c in cells} == {4}


def test_sweep_bad_axis_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
    code = main(["sweep", "--prompt", "x", "--model", str(model_dir), "--x", "colour=1,2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "NAME one of guidance_scale, steps, scheduler, guidance, seed" in err
    code = main(["sweep", "--prompt", "x", "--model", str(model_dir), "--x", "scheduler=euler,warp", "--out", str(tmp_path)])
    assert code == 2 and "unknown scheduler 'warp'" in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()


def test_jump_distances_shrink_toward_the_final_image(model_dir, tmp_path, capsys):
    code = main(["jump", "--prompt", "a red circle", "--model", str(model_dir), "--scheduler", "euler", "--steps", "6",
                 "--seed", "4", "--width", "16", "--height", "16", "--frames", "3", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "jump.json").read_text())
    steps = data["steps"]
    assert [s["step"] for s in steps] == list(range(6))
    assert set(steps[0]) >= {"step", "sigma", "sharpness", "distance_to_final"}
    assert steps[-1]["distance_to_final"] <= 0.01 < steps[0]["distance_to_final"]
    assert [r["steps"] for r in data["short_runs"]] == [1, 3]  # the shown frames below 6 steps
    assert Image.open(tmp_path / "jump.png").width > 3 * 16


def test_branch_and_dissect_write_their_files(model_dir, tmp_path, capsys):
    code = main(["branch", "--prompt", "a red circle", "--model", str(model_dir), "--steps", "4", "--seed", "4",
                 "--width", "16", "--height", "16", "--branches", "2", "--at", "0,0.5", "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "b" / "branch.json").read_text())
    assert data["at"] == [0.0, 0.5] and data["scheduler"] == "euler_a" and len(data["diversity"]) == 2
    assert [len(row) for row in data["images"]] == [2, 2] and (tmp_path / "b" / "grid.png").is_file()
    code = main(["dissect", "--prompt", "a red circle", "--model", str(model_dir), "--steps", "3", "--seed", "4", "--scheduler", "euler",
                 "--width", "16", "--height", "16", "--out", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().err
    steps = json.loads((tmp_path / "d" / "dissect.json").read_text())["steps"]
    assert len(steps) == 3 and all(s["guided"] and set(s["images"]) == {"x0", "cond", "uncond"} for s in steps)


def test_tradeoff_refuses_a_model_the_judge_cannot_score(model_dir, tmp_path, capsys):
    code = main(["tradeoff", "--prompt", "a red circle", "--model", str(model_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "can only score the embedded model 'tiny-shapes'" in err


@pytest.mark.skipif(not (ROOT / "assets" / "models" / "tiny-shapes" / "model_index.json").exists(),
                    reason="embedded model not installed")
def test_default_model_previews_show_the_final_image(tmp_path, capsys):
    """The CLI's last-step x_t and x̂0 of the default model (both the model's tiny preview decoder by default on a
    CPU; the x̂0 also decoded by the VAE when asked) show the final image: its
    previews come from the model's own preview decoder, as in the app (they once used SD 1.5's latent->RGB factors,
    0.33 mean |RGB| away, because the previewer was built from a scheduler view that does not name the folder)."""
    import numpy as np

    for i, prompt in enumerate(("a small green triangle in the top right", "a large red star on a blue background")):
        out = tmp_path / str(i)
        x0 = ("approx", "decode")[i]
        code = main(["generate", "--prompt", prompt, "--seed", str(i), "--out", str(out),
                     *(["--x0-preview", "decode"] if x0 == "decode" else [])])
        assert code == 0, capsys.readouterr().err
        trace = json.loads((out / "trace.json").read_text())
        last = trace["steps"][-1]
        assert trace["preview_kinds"] == {"latents": "approx", "x0": x0} and trace["latent_format"] == "tiny-shapes"
        final = np.asarray(Image.open(out / "image.png").convert("RGB"), dtype=np.float32) / 255
        for name in ("latents", "x0"):
            preview = np.asarray(Image.open(out / last["previews"][name]).convert("RGB"), dtype=np.float32) / 255
            assert preview.shape == final.shape
            assert np.abs(preview - final).mean() <= 0.05, (prompt, name, np.abs(preview - final).mean())


def test_a_preview_kind_the_model_lacks_is_refused_with_what_it_offers(model_dir, tmp_path, capsys):
    code = main(["generate", "--prompt", "a star", "--model", str(model_dir), "--steps", "2", "--width", "16",
                 "--height", "16", "--latents-preview", "approx", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0  # an exception instead of a status would fail the call itself
    assert "preview kind 'approx' is not offered for this model; choose one of: fast, channels, rgb, decode" in err
    assert "Traceback" not in err
