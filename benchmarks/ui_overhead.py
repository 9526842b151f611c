"""What a user waits for in the app, against the stock diffusers pipeline as a user would run it.

    python -m benchmarks.ui_overhead [--steps 20] [--guidance-scale 5] [--repeats 7] [--eager]

Baseline: `StableDiffusionPipeline.from_pretrained(folder)` and `pipe(prompt, num_inference_steps=N,
guidance_scale=s)` in a *fresh Python process* with default settings (torch's own thread count, no tuning),
timed call by call: the first call (cold) and the median of the later ones (warm).

Ours: `python app.py` started as its own process (the real launch path, the embedded default model), driven by
gradio_client over HTTP like any client:
- `/generate`: submit to returned image path;
- the Generate button's stream (`/generate_stream`): submit to the first live preview and to the update that
  carries the final image (the browser shows it from there), read from the server-sent events as a browser reads
  them in one page session (the queue's join/data routes a page uses), followed by the event the page then
  fires (scrubber, code, history), and once more through gradio_client, whose message loop polls every 50 ms.
--eager starts the app with PLAYGROUND_TRACE=0 (the UNet runs eagerly, not through its TorchScript traces), to
see what the traces are worth. Runs alternate between the two so load on a shared machine hits both alike.
Prints medians, minimums and the ratios to the warm stock call (targets: <= 1.10x to the final image, first
live preview <= 0.15 s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from gradio_client import Client
from gradio_client.utils import apply_diff

from pipelines.registry import MODELS

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a small yellow heart in the top left"
FINAL_IMAGE, LIVE_X0, RUN_ID = 4, 3, 7  # indices among the page stream's outputs (ui/live.py LiveView.live_outputs)
API_STREAM_IMAGE = 3  # /generate_stream yields (status, x_t, x̂0, image, seed, info): ui/api.py

STOCK = """
import json, sys, time
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
times = []
for i in range(int(sys.argv[4])):
    t = time.perf_counter()
    pipe(sys.argv[5], num_inference_steps=int(sys.argv[2]), guidance_scale=float(sys.argv[3]),
         generator=torch.Generator("cpu").manual_seed(i))
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "threads": torch.get_num_threads()}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stock(folder: str, steps: int, scale: float, calls: int) -> dict:
    """The stock pipeline in a fresh process: per-call seconds."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # default settings: torch picks its own thread count
    out = subprocess.run([sys.executable, "-c", STOCK, folder, str(steps), str(scale), str(calls), PROMPT],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_app(port: int, outputs: str, eager: bool = False) -> subprocess.Popen:
    env = os.environ | {"PLAYGROUND_TRACE": "0" if eager else "1", "GRADIO_SERVER_PORT": str(port),
                        "GRADIO_SERVER_NAME": "127.0.0.1", "PLAYGROUND_OUTPUTS": outputs,
                        "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("app.py did not start within 120 s")


def _is_file(value) -> bool:
    """A streamed output that is a file (a path, or a FileData dict when files are not downloaded)."""
    return isinstance(value, str) and bool(value) or isinstance(value, dict) and bool(value.get("path"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--eager", action="store_true", help="run the app's UNet eagerly (PLAYGROUND_TRACE=0)")
    args = parser.parse_args()
    folder = MODELS["tiny-shapes"].source
    outputs = tempfile.mkdtemp(prefix="ui-overhead-")
    port = free_port()
    proc = start_app(port, outputs, args.eager)
    try:
        base = f"http://127.0.0.1:{port}"
        client = Client(f"{base}/", verbose=False, download_files=False)
        http = httpx.Client(timeout=120)
        api, final, first, cold, final_client = [], [], [], [], []
        stock_warm: list[float] = []

        def generate_api(seed: int) -> float:
            t = time.perf_counter()
            client.predict(prompt=PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=seed,
                           api_name="/generate")
            return time.perf_counter() - t

        config = http.get(f"{base}/config").json()
        deps = config["dependencies"]
        widgets = {c["id"]: c for c in config["components"]}
        button = next(i for i, c in widgets.items() if c["type"] == "button" and c["props"].get("value") == "Generate")
        page_event = next(d for d in deps if [button, "click"] in d["targets"] and d["outputs"])  # private: the page's
        stream_id = page_event["id"]
        page_inputs = [widgets[i]["props"] for i in page_event["inputs"]]
        after_id = next(d["id"] for d in deps if d.get("trigger_after") == stream_id)  # the scrubber and history
        session = "benchmark-page"  # one page: a browser keeps its session across runs

        def queue_event(fn_index: int, data: list, t0: float, marks: dict) -> list:
            """Join the queue as the page does and read its server-sent events; returns the last outputs."""
            http.post(f"{base}/gradio_api/queue/join", json={
                "data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
            outputs: list = []
            with http.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session}) as stream:
                for line in stream.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    msg = json.loads(line[5:])
                    kind = msg.get("msg")
                    if kind in ("process_generating", "process_completed") and msg.get("output", {}).get("data"):
                        data_out = msg["output"]["data"]
                        if kind == "process_generating" and outputs:
                            outputs = [apply_diff(o, d) for o, d in zip(outputs, data_out)]
                        else:
                            outputs = list(data_out)
                        now = time.perf_counter() - t0
                        if "first" not in marks and _is_file(outputs[LIVE_X0]):
                            marks["first"] = now
                        if "final" not in marks and _is_file(outputs[FINAL_IMAGE]):
                            marks["final"] = now
                    if kind == "process_completed":
                        return outputs
            return outputs

        def generate_stream(seed: int) -> tuple[float, float]:
            """Submit to first live preview and to final image, read off the server-sent events of one page
            session as a browser reads them (gradio_client polls its message queue every 50 ms, which no
            browser does); then the follow-up event the page fires (scrubber, history), untimed."""
            mine = {"Prompt": PROMPT, "Steps": args.steps, "Guidance scale": args.guidance_scale, "Seed": seed,
                    "Random seed": False}  # by the widgets' labels; the rest as the page starts
            values = [mine.get(w.get("label"), w.get("value")) for w in page_inputs]
            marks: dict[str, float] = {}
            t = time.perf_counter()
            outputs = queue_event(stream_id, values, t, marks)
            queue_event(after_id, [outputs[RUN_ID]], t, {})
            return marks.get("first", float("nan")), marks.get("final", float("nan"))

        def generate_stream_client(seed: int) -> float:
            t = time.perf_counter()
            job = client.submit(prompt=PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                seed=seed, api_name="/generate_stream")
            to_final = float("nan")
            for update in job:
                if to_final != to_final and _is_file(update[API_STREAM_IMAGE]):
                    to_final = time.perf_counter() - t
            return to_final

        generate_api(0)  # the app loads the model on its first run, as it would for its first visitor
        generate_stream(0)
        generate_stream_client(0)
        for i in range(args.repeats):
            s = stock(folder, args.steps, args.guidance_scale, calls=4)
            cold.append(s["times"][0])
            stock_warm.append(statistics.median(s["times"][1:]))
            api.append(generate_api(i + 1))
            f, g = generate_stream(i + 1)
            first.append(f)
            final.append(g)
            final_client.append(generate_stream_client(i + 1))
    finally:
        proc.terminate()
        proc.wait(10)

    base = statistics.median(stock_warm)
    print(f"tiny-shapes, {args.steps} steps, guidance {args.guidance_scale:g}, {args.repeats} rounds; stock threads: "
          f"{s['threads']} (torch default); app UNet {'eager (--eager)' if args.eager else 'traced (pipelines/traced.py)'}")
    print(f"{'':44}{'median':>9}{'min':>9}{'ratio':>8}")
    rows = (("stock pipe(), fresh process, first call", cold), ("stock pipe(), fresh process, later calls", stock_warm),
            ("app /generate (gradio_client)", api), ("app Generate stream: final image", final),
            ("app Generate stream: first live preview", first),
            ("app Generate stream, gradio_client: final", final_client))
    for name, xs in rows:
        ratio = "" if "first live" in name else f"{statistics.median(xs) / base:7.2f}x"
        print(f"{name:44}{statistics.median(xs):8.3f}s{min(xs):8.3f}s{ratio:>8}")
    print(f"targets: final image <= 1.10x the warm stock call ({1.10 * base:.3f}s); first live preview <= 0.150s")


if __name__ == "__main__":
    main()
