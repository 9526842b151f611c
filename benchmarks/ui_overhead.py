"""Cost of the UI path against a bare generate() call, measured in the same process run.

    python -m benchmarks.ui_overhead [--model tiny-shapes | --tiny] [--steps 20] [--repeats 5]

The UI path is the real thing: the app served on a local port, driven by gradio_client through the
streaming endpoint the Generate button uses (live previews, trace.json, image.png, scrubber renders,
history), timed from submit to the last streamed update. The raw path is generate() with no observer.
Prints the medians and the ratio UI / raw (target <= 1.25).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines.generate import generate  # noqa: E402
from pipelines.loading import ModelLoader  # noqa: E402
from pipelines.types import DEFAULT_MODEL, GenerationRequest  # noqa: E402


FINAL_IMAGE = 4  # index of the final image among the streaming endpoint's outputs (app.py run_outputs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model key (default: the embedded model)")
    parser.add_argument("--tiny", action="store_true",
                        help="use the tiny random SD pipeline from tests/tiny.py (when the embedded model is not there)")
    parser.add_argument("--size", type=int, default=0, help="width = height in pixels (0: the model's size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--x0-preview", choices=("auto", "decode", "rgb"), default="auto",
                        help="the UI's x̂0 preview (auto: VAE decode for small images)")
    args = parser.parse_args()

    import app
    from gradio_client import Client

    loader = ModelLoader()
    model = args.model
    if args.tiny:
        from tests.tiny import tiny_pipeline

        model = "tiny-sd"
        loader.add(model, tiny_pipeline("sd"))
    request = GenerationRequest(prompt="a red circle on a blue background", model=model,
                                num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=1,
                                width=args.size or None, height=args.size or None)

    def raw() -> None:
        # In a fresh thread, as the UI runs it: called on the main thread after the server's threads had used
        # torch, generate() was at times 10x slower here (CPU thread pools of several threads contending).
        worker = threading.Thread(target=generate, args=(request,), kwargs={"loader": loader})
        worker.start()
        worker.join()

    outputs = tempfile.mkdtemp(prefix="ui-overhead-")
    demo = app.build_demo(loader=loader, models=[model], outputs_dir=outputs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    # Like a browser, which fetches preview images beside the stream, the client does not download them here.
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    updates: list[int] = []  # streamed updates per UI run
    to_image: list[float] = []  # seconds from submit to the update that carries the final image
    to_first: list[float] = []  # seconds from submit to the first streamed update (queue + SSE round trip)

    def ui() -> None:
        t = time.perf_counter()
        job = client.submit(prompt=request.prompt, model=model, num_inference_steps=args.steps,
                            guidance_scale=args.guidance_scale, seed=1, randomize_seed=False, width=args.size,
                            height=args.size, x0_preview=args.x0_preview, api_name="/generate_stream")
        n, seen_image = 0, None
        for update in job:
            n += 1
            if n == 1:
                to_first.append(time.perf_counter() - t)
            if os.environ.get("UI_OVERHEAD_TRACE"):
                print(f"  {time.perf_counter() - t:.3f}s update {n}: {str(update[0])[:60]!r}")
            if seen_image is None and _is_file(update[FINAL_IMAGE]):
                seen_image = time.perf_counter() - t
        updates.append(n)
        to_image.append(seen_image if seen_image is not None else float("nan"))

    try:
        raw()  # warm-up: loads the model and builds the scheduler view
        ui()
        # Interleave the two so background load on the machine hits both alike.
        raw_times, ui_times = [], []
        for _ in range(args.repeats):
            raw_times.append(_time(raw))
            ui_times.append(_time(ui))
    finally:
        demo.close()
    # The machine may be shared (CPU load comes and goes): report medians and minimums (best cases) of both.
    images = to_image[1:]
    print(f"model {model}, {args.steps} steps, guidance {args.guidance_scale:g}, {args.repeats} repeats "
          f"(device {loader.device}, dtype {loader.dtype}, x̂0 preview {args.x0_preview})")
    print(f"{'':26}{'median':>9}{'min':>9}")
    for name, xs in (("raw generate()", raw_times), ("UI, final image shown", images), ("UI, whole stream", ui_times),
                     ("UI, first update", to_first[1:])):
        print(f"{name:26}{statistics.median(xs):8.3f}s{min(xs):8.3f}s")
    print(f"streamed updates per run: {statistics.median(updates[1:]):.0f}; first update = Gradio queue + SSE round trip")
    for label, f in (("median", statistics.median), ("min", min)):
        raw = f(raw_times)
        print(f"ratio UI / raw ({label}): {f(images) / raw:.2f}x to the final image, {f(ui_times) / raw:.2f}x to the end "
              f"of the stream (target <= 1.25x); fixed cost {f(images) - raw:.3f}s")

def _is_file(value) -> bool:
    """A streamed output that is a file (a path, or a FileData dict when files are not downloaded)."""
    return isinstance(value, str) or isinstance(value, dict) and bool(value.get("path"))


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
