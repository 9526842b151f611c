"""Command line: `python -m pipelines generate ...`, `python -m pipelines guidance`, `python -m pipelines schedulers`.

Same API as the UI: a GenerationRequest handed to generate(), observed by a TraceWriter.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.registry import MODELS
from pipelines.schedulers import SCHEDULERS
from pipelines.types import DEFAULT_MODEL, MAX_STEPS


def _guidance_param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value of {name!r} must be a number, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description="Diffusion playground command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make one image and write image.png, trace.json and steps/ to --out",
                       description="Make one image; write DIR/image.png (A1111 `parameters` + request JSON in PNG "
                                   "text chunks), DIR/trace.json (one entry per denoising step) and DIR/steps/ "
                                   "(per-step latent→RGB and x̂0 previews).")
    _request_flags(g)
    g.add_argument("--x0-preview", choices=("decode", "fast", "approx", "taesd", "rgb", "channels", "none"), default="decode",
                   help="how steps/*_x0.png is rendered: full VAE decode (default), the model's fast colour preview, a named kind, or not at all")
    g.add_argument("--latents-preview", choices=("fast", "approx", "taesd", "rgb", "channels", "decode", "none"), default="fast",
                   help="how steps/*_latents.png is rendered (default: fast = the model's tiny preview decoder, TAESD or latent→RGB map)")

    sw = sub.add_parser("sweep", help="the same seed at several guidance scales or step counts, as one grid",
                        description="Write DIR/grid.png, DIR/<value>.png and DIR/sweep.json.")
    _request_flags(sw)
    sw.add_argument("--guidance-scales", default=None, metavar="LIST",
                    help="comma-separated guidance scales to compare (default when no --steps-list: 1,3,5,7.5,12)")
    sw.add_argument("--steps-list", default=None, metavar="LIST", help="comma-separated step counts to compare instead")

    j = sub.add_parser("jump", help="x̂0 at several steps of one run: why diffusion takes many small steps",
                       description="Write DIR/jump.png (decoded x̂0 at evenly spaced steps, then the final image) "
                                   "and DIR/jump.json (each frame's σ and its RMS distance to the final image).")
    _request_flags(j)
    j.add_argument("--frames", type=int, default=6, help="how many steps to show (default 6)")

    sub.add_parser("guidance", help="list guidance methods, their parameters, defaults and papers")
    sub.add_parser("schedulers", help="list scheduler keys")
    sub.add_parser("models", help="list the models offered by name")
    return parser


def _request_flags(g: argparse.ArgumentParser) -> None:
    """The flags that make a GenerationRequest, shared by generate, sweep and jump."""
    g.add_argument("--prompt", required=True, help="text prompt; an empty string generates unconditionally")
    g.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registry key ({', '.join(MODELS)}), a local diffusers folder or a hub id "
                        f"(default: {DEFAULT_MODEL}, the embedded model)")
    g.add_argument("--scheduler", default=None, metavar="KEY",
                   help=f"one of {', '.join(SCHEDULERS)} (default: the model's own scheduler)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps, 1..{MAX_STEPS} (default: the model's recommended, else its pipeline's default)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale s, finite and >= 0; <= 1 disables the unconditional pass "
                        "(default: the model's recommended, else its pipeline's default)")
    g.add_argument("--guidance", default="cfg", metavar="KEY",
                   help="guidance method (see `python -m pipelines guidance`; default: cfg)")
    g.add_argument("--guidance-param", action="append", type=_guidance_param, default=[], metavar="NAME=VALUE",
                   help="a guidance method parameter, repeatable (e.g. guidance_rescale=0.7)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, reported)")
    g.add_argument("--width", type=int, default=None, help="width in pixels, a multiple of the model's factor "
                                                           "(default: the model's native size)")
    g.add_argument("--height", type=int, default=None, help="height in pixels, as --width")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")


def _request(args: argparse.Namespace):
    """(loader, pipeline, request) from the shared flags, through the same builder as the UI and the HTTP API."""
    from pipelines.loading import ModelLoader
    import torch

    from pipelines.requests import build_request
    from pipelines.worker import threads_for

    loader = ModelLoader(device=args.device)
    pipe, _ = loader.view(args.model, None)  # loads once (validating the model first); generate() reuses it
    torch.set_num_threads(threads_for(pipe, loader.device, torch.get_num_threads()))  # 1 for the embedded model
    request = build_request(
        prompt=args.prompt, negative_prompt=args.negative_prompt, model=args.model, loader=loader,
        scheduler=args.scheduler, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
        width=args.width, height=args.height, guidance=args.guidance, guidance_params=dict(args.guidance_param),
    )
    return loader, pipe, request


def _generate(args: argparse.Namespace) -> int:
    from pipelines.generate import generate
    from pipelines.outputs import TraceWriter
    from pipelines.previews import Previewer

    loader, pipe, request = _request(args)
    previewer = Previewer(pipe)
    fast = previewer.fast_kind  # "fast": the model's cheapest faithful colour preview (tiny decoder, TAESD, map)
    previews = {name: (src, fast if kind == "fast" else kind) for name, src, kind in (
        ("latents", "latents", args.latents_preview), ("x0", "denoised", args.x0_preview)) if kind != "none"}
    writer = TraceWriter(args.out, previewer, previews)
    result = generate(request, writer, loader=loader)
    writer.finish(result)
    t = result.timings
    print(f"wrote {os.path.join(args.out, 'image.png')} ({result.width}x{result.height}, seed {result.seed}, "
          f"{result.scheduler}, {result.steps_completed} steps in {t.denoise:.2f}s, total {t.total:.2f}s)")
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
    from pathlib import Path

    from pipelines.explain import grid, sweep
    from pipelines.outputs import save_image, save_png, write_json

    loader, _, request = _request(args)
    if args.steps_list:
        field, values = "num_inference_steps", _number_list(args.steps_list, int)
    else:
        field, values = "guidance_scale", _number_list(args.guidance_scales or "1,3,5,7.5,12", float)
    results = sweep(request, field, values, loader=loader)
    out = Path(args.out)
    short = {"guidance_scale": "CFG", "num_inference_steps": "steps"}[field]
    for v, r in zip(values, results):
        save_image(out / f"{short}_{v:g}.png", r)
    title = f"{request.prompt!r} seed {results[0].seed}"
    save_png(out / "grid.png", grid([r.image for r in results], [f"{short} {v:g}" for v in values], title=title))
    write_json(out / "sweep.json", {"field": field, "seed": results[0].seed, "request": request.to_dict(),
                                    "images": [f"{short}_{v:g}.png" for v in values]})
    print(f"wrote {out / 'grid.png'} ({len(results)} images, seed {results[0].seed})")
    return 0


def _jump(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.explain import grid, jump
    from pipelines.outputs import save_png, write_json

    loader, _, request = _request(args)
    frames, result = jump(request, loader=loader, frames=args.frames)
    out = Path(args.out)
    labels = [f"x0 @ step {f.step + 1}, d={f.distance:.2f}" for f in frames] + ["final"]  # ASCII: PIL's default font has no combining hat
    save_png(out / "jump.png", grid([f.image for f in frames] + [result.image], labels,
                                   title=f"{request.prompt!r}: predicted clean image at each step vs the final image"))
    write_json(out / "jump.json", {"seed": result.seed, "request": request.to_dict(), "frames": [
        {"step": f.step, "sigma": f.sigma, "rms_distance_to_final": round(f.distance, 4)} for f in frames]})
    print(f"wrote {out / 'jump.png'} (seed {result.seed}); RMS distance of x̂0 to the final image by step: "
          + ", ".join(f"{f.step + 1}: {f.distance:.3f}" for f in frames))
    return 0


def _quiet_library_progress() -> None:
    """Loading bars from diffusers/transformers would bury the one line this command prints."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_progress()
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "jump":
            return _jump(args)
        if args.command == "guidance":
            from guidance.registry import describe

            print(describe())
        elif args.command == "schedulers":
            for spec in SCHEDULERS.values():
                print(f"{spec.key:16} {spec.cls.__name__:34} {spec.kind:9} A1111: {spec.label}")
        elif args.command == "models":
            for m in MODELS.values():
                print(f"{m.key:18} {m.source:55} {m.note}")
        return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
