"""The app as a public Space sees it: callers that cancel or vanish mid-run, many runs from one client, and
memory that must not grow with what strangers ask for. Served for real around a tiny real pipeline."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from pipelines.loading import ModelLoader
from tests.test_app import free_port
from tests.tiny import tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")

MODEL = "tiny-sd"
LONG = 900  # steps: ~15-30 s of worker time on this CPU, far longer than any wait below


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import app

    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    demo = app.build_demo(loader=loader, models=[MODEL], outputs_dir=tmp_path_factory.mktemp("outputs"),
                          preview_interval=0.05)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/", demo.playground
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def _quick(client) -> float:
    t = time.perf_counter()
    client.predict(prompt="x", num_inference_steps=2, seed=1, api_name="/generate")
    return time.perf_counter() - t


@pytest.mark.parametrize("api", ["/generate", "/generate_stream"])
def test_a_cancelled_run_frees_the_worker_and_leaves_no_threads(server, client, api):
    _, playground = server
    _quick(client)
    counts = []
    for _ in range(4):
        job = client.submit(prompt="x", num_inference_steps=LONG, seed=2, api_name=api)
        deadline = time.time() + 30
        while not playground.active and time.time() < deadline:  # the long run is on the worker
            time.sleep(0.05)
        assert playground.active, "the long run never started"
        time.sleep(0.3)
        job.cancel()
        took = _quick(client)
        assert took < 8, f"the next request waited {took:.1f} s behind a cancelled {LONG}-step run"
        counts.append(threading.active_count())
    # Thread pools (the server's and the client's) warm up on the first cycle; after that nothing accumulates.
    assert counts[-1] <= counts[0], (counts, [t.name for t in threading.enumerate()])
    assert not playground.active


def test_a_stream_whose_client_goes_away_stops_its_run(server, client):
    url, playground = server
    info = httpx.get(f"{url}gradio_api/info").json()["named_endpoints"]["/generate_stream"]["parameters"]
    values = {p["parameter_name"]: p.get("parameter_default") for p in info} | {"prompt": "x", "num_inference_steps": LONG}
    event = httpx.post(f"{url}gradio_api/call/generate_stream",
                       json={"data": [values[p["parameter_name"]] for p in info]}).json()["event_id"]
    with httpx.stream("GET", f"{url}gradio_api/call/generate_stream/{event}", timeout=30) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: generating"):
                break  # the run is going; now the client disappears
    took = _quick(client)
    assert took < 8, f"the next request waited {took:.1f} s behind an abandoned {LONG}-step stream"
