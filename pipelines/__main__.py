"""Command line: `python -m pipelines generate ...`, the Explain lab's experiments (sweep, jump, branch, dissect,
tradeoff, attention, layout: pipelines/explain/) and the listings (guidance, schedulers, models).

Same API as the UI: a GenerationRequest from pipelines.requests.build_request, handed to generate().
A refusal is one line on stderr, `error: ...`, and an exit status that says what kind (EXIT_STATUS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

# Before transformers is imported: its import-time notices (e.g. "requires torchvision (not installed)") would
# otherwise come before a refusal's one line; _quiet_library_progress sets the same level once it is imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from guidance.registry import catalogue, describe  # noqa: E402
from pipelines import explain  # noqa: E402
from pipelines.errors import NonFiniteLatents, shown  # noqa: E402
from pipelines.generate import generate  # noqa: E402
from pipelines.loading import ModelLoader  # noqa: E402
from pipelines.outputs import TraceWriter  # noqa: E402
from pipelines.prompts import switch_at  # noqa: E402
from pipelines.registry import MODELS  # noqa: E402
from pipelines.requests import Limits, build_request  # noqa: E402
from pipelines.schedulers import SCHEDULERS  # noqa: E402
from pipelines.types import DEFAULT_MODEL, MAX_IMAGES_PER_PROMPT, MAX_STEPS  # noqa: E402
from pipelines.words import counted  # noqa: E402


EXIT_OK = 0
EXIT_IO = 1  # files could not be read or written during the run (disk full, folder removed, ...)
EXIT_REFUSED = 2  # bad input, refused before or while loading: the line says what is allowed
EXIT_NON_FINITE = 3  # the run made NaN/inf latents and stopped (pipelines.errors.NonFiniteLatents)
EXIT_STATUS = ("exit status: 0 done; 1 files could not be read or written; 2 refused (bad input, one line saying what "
               "is allowed); 3 the run made NaN or infinite latents and stopped (the line names the step, the "
               "scheduler and what to try)")

# Kernel interfaces, not storage: an --out resolved under them is refused whatever the permissions say (root may
# create folders in some of them).
KERNEL_FILESYSTEMS = (Path("/proc"), Path("/sys"))
_DEVICE_FORM = re.compile(r"cpu|mps|cuda(?::[0-9]+)?")


def check_out(out: str) -> None:
    """Refuse an --out that cannot become a folder of results, before any model loads: an existing file (or a path
    through one), a path under /proc or /sys, a folder this process cannot create files in. Leaves nothing behind."""
    try:
        path = Path(out).resolve()  # symlinks followed: /proc/self/cwd/x is the working folder's x, which is fine
        for root in KERNEL_FILESYSTEMS:
            if path == root or root in path.parents:
                raise ValueError(f"--out {shown(out)} is under {root}, a kernel filesystem, not storage; "
                                 "choose a folder on disk")
        existing = path
        while not existing.exists():  # the nearest folder that exists: the run creates the rest
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"goes through {shown(str(existing))}, a file"
            raise ValueError(f"--out {shown(out)} {where}, not a folder; name a folder (created if missing)")
        with tempfile.TemporaryFile(dir=existing):  # the honest test: os.access says yes to root on read-only places
            pass
    except (OSError, RuntimeError) as e:  # RuntimeError: Python 3.11's resolve() on a symlink loop
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"--out {shown(out)} cannot be written ({reason}); choose a folder you can write to") from None


def usable_devices() -> list[str]:
    """The --device values this torch build and machine can run: cpu, cuda and cuda:N per GPU, mps."""
    devices = ["cpu"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices += ["cuda", *(f"cuda:{n}" for n in range(gpus))] if gpus else []
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(device: str | None) -> None:
    """Refuse a --device this machine cannot use, before any model loads; None picks one (ModelLoader)."""
    if device is None or device in (usable := usable_devices()):
        return
    if not _DEVICE_FORM.fullmatch(device):
        raise ValueError(f"--device {shown(device)} is not a device: a device is cpu, cuda, cuda:N or mps; "
                         f"usable here: {', '.join(usable)}")
    raise ValueError(f"--device {device!r} is not available with this torch build ({torch.__version__}) on this "
                     f"machine; usable here: {', '.join(usable)}")


def _guidance_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value of {name!r} must be a number, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Diffusion playground command line.",
                                     epilog=EXIT_STATUS)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make an image (or a batch) and write image.png, trace.json and steps/ to --out",
                       description="Make one image; write DIR/image.png (A1111 `parameters` + request JSON in PNG "
                                   "text chunks), DIR/trace.json (one entry per denoising step) and DIR/steps/ "
                                   "(per-step latent→RGB and x̂0 previews).")
    _request_flags(g)
    g.add_argument("--num-images-per-prompt", type=int, default=1, metavar="N",
                   help=f"a batch of N images in one batched run (default 1, at most {MAX_IMAGES_PER_PROMPT}, within the "
                        "work budget): image i uses seed + i and is the single run with that seed; written as "
                        "DIR/image.png, DIR/image_1.png, …, each with its own seed in its metadata; steps/ previews "
                        "show the first image")
    g.add_argument("--x0-preview", choices=("auto", "decode", "fast", "approx", "taesd", "rgb", "channels", "none"), default="auto",
                   help="how steps/*_x0.png is rendered: auto (default: on a CPU the model's faithful fast preview, such as "
                        "its tiny decoder, else a full VAE decode), decode, fast, a named kind, or none")
    g.add_argument("--latents-preview", choices=("fast", "approx", "taesd", "rgb", "channels", "decode", "none"), default="fast",
                   help="how steps/*_latents.png is rendered (default: fast = the model's tiny preview decoder, TAESD or latent→RGB map)")

    sw = sub.add_parser("sweep", help="a grid over one or two settings, every cell with the same seed",
                        description="Write DIR/grid.png (labelled axes), DIR/cells/RR_CC.png and DIR/sweep.json "
                                    '({"cells": [{"x", "y", "settings", "image", ...}, ...]}, row-major). Axes: '
                                    "guidance_scale, steps, scheduler, guidance (the method), seed.")
    _request_flags(sw)
    sw.add_argument("--x", default=None, metavar="NAME=V1,V2,...",
                    help="the x axis, e.g. guidance_scale=1,3,7.5,12 or guidance=cfg,rescale,apg,pag "
                         "(default: guidance_scale=1,3,5,7.5,12)")
    sw.add_argument("--y", default=None, metavar="NAME=V1,V2,...", help="an optional y axis, e.g. steps=2,5,20")
    sw.add_argument("--guidance-scales", default=None, metavar="LIST", help="shorthand for --x guidance_scale=LIST")
    sw.add_argument("--steps-list", default=None, metavar="LIST", help="shorthand for --x steps=LIST")

    j = sub.add_parser("jump", help="jump vs walk: every step's x̂0 against the final image, and k-step runs",
                       description="Write DIR/jump.json (per step: sigma, x̂0 sharpness, its RMS distance to the final "
                                   "image; bands: how much x̂0 changed in low/mid/high spatial frequencies; "
                                   "short_runs: separate k-step runs), DIR/jump.png, DIR/final.png, DIR/x0/NNN.png and DIR/short_K.png.")
    _request_flags(j)
    j.add_argument("--frames", type=int, default=6, help="how many steps jump.png shows (default 6)")
    j.add_argument("--short-runs", default=None, metavar="LIST",
                   help="step counts k of the separate k-step runs (default: the shown steps below --steps)")

    b = sub.add_parser("branch", help="branching: run to a fraction of the schedule, finish with different noise",
                       description="Write DIR/branch.json ({at, diversity, x0_to_mean, images: [[...] per branch "
                                   "point], means, x0}), DIR/grid.png, DIR/branches/, DIR/means/ (the pixel mean of the "
                                   "endings per branch point) and DIR/x0/ (x̂0 at each branch step). The scheduler defaults to euler_a (stochastic); "
                                   "with a deterministic one (ddim, dpmpp_2m) every branch is the same image.")
    _request_flags(b, scheduler_default="euler_a")
    b.add_argument("--branches", type=int, default=4, help="endings per branch point (default 4)")
    b.add_argument("--at", default="0.1,0.3,0.5,0.7,0.9", metavar="LIST",
                   help="branch points as fractions of the schedule in [0, 1) (default 0.1,0.3,0.5,0.7,0.9)")

    d = sub.add_parser("dissect", help="guidance dissection: conditional, unconditional and guided x̂0 per step",
                       description="Write DIR/dissect.json (per step: guided, ‖ε_c − ε_u‖, effective scale, "
                                   "‖x̂0_k − x̂0_k−1‖, image paths; interval: first and last guided step when guidance "
                                   "is off on some), DIR/dissect.png and DIR/steps/.")
    _request_flags(d)
    d.add_argument("--frames", type=int, default=6, help="how many steps dissect.png shows (default 6)")

    t = sub.add_parser("tradeoff", help="diversity vs adherence over guidance scales (embedded model, the judge)",
                       description="Write DIR/tradeoff.json (per scale: adherence by the shapes-world judge, "
                                   "diversity, image paths) and DIR/tradeoff.png. Embedded model only, one-object "
                                   "prompts that name a shape.")
    _request_flags(t)
    t.add_argument("--scales", default="1,2,3,5,7.5,12", metavar="LIST",
                   help="guidance scales to compare (default 1,2,3,5,7.5,12)")
    t.add_argument("--seeds", type=int, default=8, help="images per scale, seeds s, s+1, ... (default 8)")

    a = sub.add_parser("attention", help="which word drew where: per-word cross-attention maps, per step and for the run",
                       description="One run with attention probes on its cross-attention layers (SD, SDXL, PixArt-Σ; "
                                   "SD3's joint attention, image to text). Write DIR/image.png, DIR/attention.json "
                                   '({"words": [{"word", "index", "map", "steps": [{"step", "map"}]}], ...}), '
                                   "DIR/maps/<index>.png (each word's greyscale map at image size for the whole run), "
                                   "DIR/steps/NNN_<index>.png and DIR/steps/NNN_x0.png per step, and DIR/attention.png "
                                   "(every word's map over the image). On the embedded model each word also gets the "
                                   "share of its map on the object (on_object).")
    _request_flags(a)

    lay = sub.add_parser("layout", help="when is the layout decided: a [from:to:when] switched at several points",
                         description="The prompt's one prompt schedule [from:to:when] (its when, a number or the word "
                                     "WHEN, is replaced by each switch point), the same seed(s) in every column; the "
                                     "shapes world's judge reads each image. Write DIR/layout.json ({fractions, "
                                     "switch_steps, counts, words, cells: [{fraction, seed, prompt, reads, judge, "
                                     "image}]}), DIR/layout.png and DIR/cells/. Embedded model only.")
    _request_flags(lay)
    lay.add_argument("--switch-at", default=",".join(f"{f:g}" for f in explain.SWITCH_POINTS), metavar="LIST",
                     help="switch points as fractions of the steps, 0 (the new text from the start) to 1 (never) "
                          "(default " + ",".join(f"{f:g}" for f in explain.SWITCH_POINTS) + ")")
    lay.add_argument("--seeds", type=int, default=1, help="seeds s, s+1, ... (a row each; default 1)")

    gl = sub.add_parser("guidance", help="list guidance methods, their parameters, defaults and papers")
    gl.add_argument("--json", action="store_true",
                    help='print a JSON list of {"key", "diffusers", "params", "paper"} ("diffusers": the guider class '
                         'the method agrees with numerically, or null)')
    sub.add_parser("schedulers", help="list scheduler keys")
    sub.add_parser("models", help="list the models offered by name")
    return parser


def _request_flags(g: argparse.ArgumentParser, scheduler_default: str | None = None) -> None:
    """The flags that make a GenerationRequest, shared by generate and every experiment."""
    g.epilog = EXIT_STATUS
    g.add_argument("--prompt", required=True, help="text prompt; an empty string generates unconditionally")
    g.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry key ({', '.join(MODELS)}), a local diffusers folder or a hub id "
                        f"(default: {DEFAULT_MODEL}, the embedded model)")
    own = scheduler_default or "the model's own scheduler"
    g.add_argument("--scheduler", default=scheduler_default, metavar="KEY",
                   help=f"one of {', '.join(SCHEDULERS)} (default: {own})")
    g.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps, 1..{MAX_STEPS} (default: the model's recommended, else its pipeline's default)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale s, finite and >= 0; <= 1 disables the unconditional pass "
                        "(default: the model's recommended, else its pipeline's default); for Flux the distilled "
                        "guidance the model takes as an input (one pass; see --true-cfg-scale)")
    g.add_argument("--true-cfg-scale", type=float, default=None, metavar="S",
                   help="Flux only: true CFG, a second pass on the negative prompt (an empty one is \"\") mixed as "
                        "neg + S (cond - neg), as diffusers' FluxPipeline true_cfg_scale; on above 1 (default 1: off)")
    g.add_argument("--guidance", default=None, metavar="KEY",
                   help="guidance method (see `python -m pipelines guidance`; default: the model's recommended, else cfg)")
    g.add_argument("--guidance-param", action="append", type=_guidance_param, default=[], metavar="NAME=VALUE",
                   help="a guidance method parameter, repeatable (e.g. guidance_rescale=0.7)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, reported)")
    g.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of the model's factor "
                                                           "(default: the model's native size)")
    g.add_argument("--height", type=int, default=None, help="height in pixels, as --width")
    g.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N or mps where available (default: cuda if available, else cpu)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created if missing; checked before the model loads)")


def _request(args: argparse.Namespace, trace: bool = True):
    """(loader, pipeline, request) from the shared flags, through the same builder as the UI and the HTTP API.
    trace: whether small UNets run through TorchScript traces (pipelines/traced.py): a trace costs ~0.5 s once and
    saves ~6 ms per UNet call on the embedded model, so it pays from about the fifth 20-step run of a process."""
    loader = ModelLoader(device=args.device, trace=trace)
    pipe = loader.get(args.model)  # loads once (validating the model first); generate() reuses it
    request = build_request(
        prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model, loader=loader,
        scheduler=args.scheduler, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        width=args.width, height=args.height, guidance=args.guidance, guidance_params=dict(args.guidance_param) or None,
        num_images_per_prompt=getattr(args, "num_images_per_prompt", None), true_cfg_scale=args.true_cfg_scale,
        limits=Limits.from_env(os.environ),
    )
    # Measured for this model and size (pipelines/threads.py): 1 for the embedded model, all cores for larger UNets.
    torch.set_num_threads(loader.threads(request.model, request.height, request.width, serving=False,
                                         default=torch.get_num_threads(), images=request.num_images_per_prompt).threads)
    return loader, pipe, request


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def _generate(args: argparse.Namespace) -> int:
    loader, pipe, request = _request(args, trace=False)  # one image: a trace would cost more than it saves
    # The loaded model's previewer (a scheduler view's config does not name the folder with its preview decoder);
    # "fast" is the model's cheapest faithful colour preview (tiny decoder, TAESD, map), as in the app.
    policy = loader.profile(request.model).previews
    previews = {name: (src, policy.kind(kind)) for name, src, kind in (
        ("latents", "latents", args.latents_preview),
        ("x0", "denoised", policy.cli_x0() if args.x0_preview == "auto" else args.x0_preview)) if kind != "none"}
    writer = TraceWriter(args.out, loader.previewer(request.model), previews)
    t0 = time.perf_counter()
    result = generate(request, writer, loader=loader)
    trace = writer.finish(result)
    written = time.perf_counter() - t0
    t = result.timings
    n = len(result.images)
    seeds = f"seed {result.seed}" if n == 1 else f"seeds {result.seed}–{result.seed + n - 1}"
    names = ", ".join(trace.images) if n <= 4 else f"{trace.images[0]} … {trace.images[-1]}"
    also = "" if n == 1 else f" ({n} images: {names})"
    print(f"wrote {os.path.join(args.out, 'image.png')}{also} ({result.width}x{result.height}, {seeds}, "
          f"{result.scheduler}, {counted(result.steps_completed, 'step')} in {t.denoise:.2f}s on {_threads()}, "
          f"written in {written:.2f}s)")
    return 0


def _number_list(text: str, cast) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"expected comma-separated numbers, got {text!r}")
    return values


def _sweep(args: argparse.Namespace) -> int:
    given = [f for f in (args.x, args.guidance_scales, args.steps_list) if f]
    if len(given) > 1:
        raise ValueError("give the x axis once: --x, --guidance-scales or --steps-list")
    if args.steps_list:
        x = explain.parse_axis(f"steps={args.steps_list}")
    elif args.guidance_scales:
        x = explain.parse_axis(f"guidance_scale={args.guidance_scales}")
    else:
        x = explain.parse_axis(args.x or "guidance_scale=1,3,5,7.5,12")
    y = explain.parse_axis(args.y) if args.y else None
    loader, _, request = _request(args)
    report = _run(explain.sweep(request, x, y, loader=loader), lambda r: f"cell {len(r.cells)}/{r.total}")
    report.write(args.out)
    seeds = sorted({c.result.seed for c in report.cells})
    print(f"wrote {os.path.join(args.out, 'grid.png')} ({counted(len(report.cells), 'cell')}, "
          f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})")
    return 0


def _jump(args: argparse.Namespace) -> int:
    loader, _, request = _request(args)
    shorts = None if args.short_runs is None else _number_list(args.short_runs, int)
    report = _run(explain.jump(request, loader=loader, short_steps=shorts, frames=args.frames),
                  lambda r: f"short runs {len(r.short_runs)}/{len(r.short_steps)}")
    report.write(args.out, frames=args.frames)
    picks = explain.frame_steps(len(report.steps), args.frames)
    print(f"wrote {os.path.join(args.out, 'jump.png')} (seed {report.request.seed}); by step, RMS distance of x̂0 to "
          "the final image / sharpness: " + ", ".join(
              f"{k + 1}: {report.steps[k].distance_to_final:.3f}/{report.steps[k].sharpness:.4f}" for k in picks))
    print("coarse before fine, the low band's share of x̂0's change (the layout first, then the details): " + ", ".join(
        f"{k + 1}: {shares[0]:.2f}" for k in picks if (shares := report.steps[k].band_shares()) is not None))
    return 0


def _branch(args: argparse.Namespace) -> int:
    at = _number_list(args.at, float)
    loader, _, request = _request(args)
    report = _run(explain.branch(request, at, args.branches, loader=loader),
                  lambda r: f"branch point {len(r.points)}/{len(r.at)}")
    report.write(args.out)
    note = "" if report.stochastic else f" ({report.scheduler} draws no noise after the start: branches are identical)"
    print(f"wrote {os.path.join(args.out, 'grid.png')} (seed {report.request.seed}, {report.scheduler}); diversity by "
          "branch point: " + ", ".join(f"{p.fraction:g}: {p.diversity:.4f}" for p in report.points) + note)
    print("x̂0's RMS distance to the mean of the endings (x̂0 estimates that mean): "
          + ", ".join(f"{p.fraction:g}: {p.x0_to_mean:.4f}" for p in report.points))
    return 0


def _dissect(args: argparse.Namespace) -> int:
    loader, _, request = _request(args)
    report = _run(explain.dissect(request, loader=loader), lambda r: "")
    report.write(args.out, frames=args.frames)
    where = "" if report.interval is None else f"; guidance on at steps {report.interval[0] + 1}-{report.interval[1] + 1}"
    print(f"wrote {os.path.join(args.out, 'dissect.png')} (seed {report.request.seed}, {counted(len(report.steps), 'step')}{where})")
    return 0


def _tradeoff(args: argparse.Namespace) -> int:
    scales = _number_list(args.scales, float)
    explain.check_judge_model(args.model)  # before loading a model the judge cannot score
    explain.judge_targets(args.prompt)
    loader, _, request = _request(args)
    report = _run(explain.tradeoff(request, scales, args.seeds, loader=loader),
                  lambda r: f"scale {len(r.points)}/{len(r.scales)}")
    report.write(args.out)
    print(f"wrote {os.path.join(args.out, 'tradeoff.png')} (seeds {report.request.seed}..{report.request.seed + args.seeds - 1}); "
          "guidance scale: adherence / diversity: " + ", ".join(
              f"{p.guidance_scale:g}: {p.adherence:.2f}/{p.diversity:.3f}" for p in report.points))
    return 0


def _layout(args: argparse.Namespace) -> int:
    points = explain.parse_points(args.switch_at)
    explain.check_judge_model(args.model)  # before loading a model the judge cannot score
    args.prompt = switch_at(args.prompt, "0")  # a placeholder when (WHEN) becomes a valid one; each point replaces it
    loader, _, request = _request(args)
    report = _run(explain.layout(request, points, args.seeds, loader=loader),
                  lambda r: f"run {len(r.cells)}/{len(r.fractions) * len(r.seeds)}")
    report.write(args.out)
    read = ", ".join(f"{f:g}: " + "/".join(f"{c[k]} {k}" for k in ("from", "to") if c[k])
                     for f, c in zip(report.fractions, report.counts()))
    print(f"wrote {os.path.join(args.out, 'layout.png')} (seeds {report.seeds[0]}..{report.seeds[-1]}); "
          f"by switch point, seeds showing from / to: {read}. {report.words()}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    loader, _, request = _request(args, trace=False)  # one run, eager anyway: the probes replace the traced call
    report = _run(explain.attention(request, loader=loader),
                  lambda r: f"x̂0 decoded {sum(s.x0 is not None for s in r.steps)}/{len(r.steps)}")
    try:
        explain.check_judge_model(request.model)
        mask = explain.object_mask(report.result.image)  # the shapes world's object, as the judge segments it
    except ValueError:
        mask = None  # another model's pictures: no object to measure against
    data = report.write(args.out, mask=mask)
    where = ""
    if mask is not None:
        where = (f"; share of each word's region on the object ({data['object']['area']:.1%} of the image): " +
                 ", ".join(f"{w['word']} {w['on_object']['region']:.2f}" for w in data["words"]))
    print(f"wrote {os.path.join(args.out, 'attention.json')} (seed {report.request.seed}, {len(report.words)} words, "
          f"{report.layers} attention layers, {counted(len(report.steps), 'step')}){where}")
    return 0


def _run(experiment, progress):
    """Run an experiment to its end, saying how far it is on stderr (stdout keeps the one result line)."""
    report = None
    for report in experiment:
        if not report.done and progress(report):
            print(progress(report), file=sys.stderr, flush=True)
    if report is None:
        raise ValueError("the experiment made no result")
    return report


def _quiet_library_progress() -> None:
    """Loading bars from diffusers/transformers would bury the one line this command prints."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def _error(e: BaseException) -> None:
    """The one stderr line of a refusal (a message over several lines is joined)."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_progress()
    try:
        if getattr(args, "out", None) is not None:  # before any model loads: a wrong path costs no wait
            check_out(args.out)
        check_device(getattr(args, "device", None))
        if args.command == "generate":
            return _generate(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "jump":
            return _jump(args)
        if args.command == "branch":
            return _branch(args)
        if args.command == "dissect":
            return _dissect(args)
        if args.command == "tradeoff":
            return _tradeoff(args)
        if args.command == "attention":
            return _attention(args)
        if args.command == "layout":
            return _layout(args)
        if args.command == "guidance":
            print(json.dumps(catalogue(), indent=2, ensure_ascii=False) if args.json else describe())
        elif args.command == "schedulers":
            for spec in SCHEDULERS.values():
                print(f"{spec.key:16} {spec.cls.__name__:34} {spec.kind:9} A1111: {spec.label}")
        elif args.command == "models":
            for m in MODELS.values():
                print(f"{m.key:18} {m.source:55} {m.note}")
        return EXIT_OK
    except NonFiniteLatents as e:  # a ValueError, but not the input's fault as such: scripts may retry otherwise
        _error(e)
        return EXIT_NON_FINITE
    except ValueError as e:
        _error(e)
        return EXIT_REFUSED
    except OSError as e:  # mid-run: disk full, the folder removed; its text names the file
        _error(e)
        return EXIT_IO


if __name__ == "__main__":
    sys.exit(main())
