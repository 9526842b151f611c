"""Serving the real app in a test: build_demo around a given loader on a free loopback port (`serve`), or
`python app.py` itself in a child process (`app_process`); `Visitor` calls either over raw HTTP from its own
loopback address."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipelines.loading import ModelLoader

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(loader: ModelLoader, outputs: Path, **kwargs):
    """The real app (app.build_demo(loader=..., outputs_dir=..., **kwargs)) on a free port: yields (url, demo)."""
    import app

    demo = app.build_demo(loader=loader, outputs_dir=outputs, **kwargs)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()


def wait_until(condition, timeout: float, what: str) -> None:
    """Wait for `condition()` with a deadline (a hang guard, not a timing claim); fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout:g} s)")
        time.sleep(0.02)


@contextlib.contextmanager
def app_process(outputs: Path, env: dict[str, str] | None = None, timeout: float = 120.0):
    """`python app.py` itself, in a child process on a free loopback port, with `env` on top of this one's (e.g.
    PLAYGROUND_TRUSTED_PROXY_HOPS): yields its URL once it answers; its output is in outputs/../app-PORT.log."""
    with app_processes([(outputs, env)], timeout) as (url,):
        yield url


@contextlib.contextmanager
def app_processes(apps: list[tuple[Path, dict[str, str] | None]], timeout: float = 120.0):
    """app_process for each (outputs, env), all started at once (their imports and warm-ups overlap on the cores):
    yields their URLs, in order, once every one answers."""
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(_app_started(outputs, env)) for outputs, env in apps]
        for proc, url, log_path in started:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"python app.py exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    if httpx.get(url + "config", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"python app.py did not answer in {timeout:g} s: {log_path.read_text()[-2000:]}")
                time.sleep(0.25)
        yield [url for _, url, _ in started]


@contextlib.contextmanager
def _app_started(outputs: Path, env: dict[str, str] | None):
    """`python app.py` started (not yet answering): yields (process, URL, log path); stops it on exit."""
    port = free_port()
    log_path = outputs.parent / f"app-{port}.log"
    full_env = dict(os.environ) | {"GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
                                   "PLAYGROUND_OUTPUTS": str(outputs), "HF_HUB_OFFLINE": "1",
                                   "GRADIO_ANALYTICS_ENABLED": "False"} | (env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}/", log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Visitor:
    """A caller of a served app over raw HTTP, from its own loopback address (the socket is bound to `address`,
    e.g. 127.0.0.2, so the server sees a distinct client), optionally sending `headers` (X-Forwarded-For). Speaks
    Gradio's queue protocol: join (POST /gradio_api/queue/join) and read results from the session's SSE stream."""

    def __init__(self, url: str, address: str = "127.0.0.1", headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers or {}, timeout=60,
                                 transport=httpx.HTTPTransport(local_address=address))
        self.session = secrets.token_hex(8)
        self._sessions: dict[str, str] = {}  # event id -> the session it was queued in
        info = self.http.get("/gradio_api/info").json()["named_endpoints"]
        config = self.http.get("/config").json()
        self._fn = {"/" + d["api_name"]: i for i, d in enumerate(config["dependencies"]) if d.get("api_name")}
        self._params = {name: [(p["parameter_name"], p.get("parameter_default")) for p in e["parameters"]]
                        for name, e in info.items()}

    def join(self, api_name: str, new_session: bool = False, **values) -> httpx.Response:
        """Queue one call of `api_name` with `values` (the rest at their defaults); the server's answer.
        new_session: as a new browser tab would (one session runs one experiment at a time: its next replaces it)."""
        session = secrets.token_hex(8) if new_session else self.session
        params = self._params[api_name]
        unknown = set(values) - {n for n, _ in params}
        if unknown:
            raise ValueError(f"{api_name} has no parameters {sorted(unknown)}")
        data = [values.get(name, default) for name, default in params]
        answer = self.http.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": self._fn[api_name], "session_hash": session, "event_data": None,
            "trigger_id": None})
        if answer.status_code == 200:
            self._sessions[answer.json()["event_id"]] = session
        return answer

    def results(self, event_ids: set[str], timeout: float = 120.0) -> dict[str, dict]:
        """The final message (process_completed) of each of `event_ids`, read from this visitor's SSE stream."""
        done: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        with self.http.stream("GET", f"/gradio_api/queue/data?session_hash={self.session}", timeout=timeout) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "process_completed" and msg.get("event_id") in event_ids:
                        done[msg["event_id"]] = msg
                if set(done) == event_ids or time.monotonic() > deadline:
                    break
        return done

    def wait_started(self, event_id: str, timeout: float = 60.0) -> None:
        """Wait until the server starts the handler of `event_id` (its "process_starts" message)."""
        deadline = time.monotonic() + timeout
        session = self._sessions.get(event_id, self.session)
        with self.http.stream("GET", f"/gradio_api/queue/data?session_hash={session}", timeout=timeout) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("event_id") == event_id and msg.get("msg") in ("process_starts", "process_completed"):
                        return
                if time.monotonic() > deadline:
                    break
        raise TimeoutError(f"event {event_id} did not start in {timeout:g} s")

    def call(self, api_name: str, timeout: float = 120.0, **values) -> dict:
        """join + wait: the completed message ({"success": bool, "output": {...}})."""
        answer = self.join(api_name, **values)
        answer.raise_for_status()
        event = answer.json()["event_id"]
        return self.results({event}, timeout)[event]

    def join_raw(self, api_name: str, data: list) -> httpx.Response:
        """Queue any event of the page, public or private, with `data` as the page would send it (positional)."""
        return self.http.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": self._fn[api_name], "session_hash": self.session, "event_data": None,
            "trigger_id": None})

    def cancel(self, api_name: str, event_id: str) -> None:
        """Cancel one queued or running event of this visitor (Gradio's /cancel, as a Stop button sends)."""
        self.http.post("/gradio_api/cancel", json={"session_hash": self._sessions.get(event_id, self.session),
                                                   "fn_index": self._fn[api_name], "event_id": event_id})

    def close(self) -> None:
        self.http.close()
