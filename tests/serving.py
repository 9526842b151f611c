"""One way to serve the real app in a test: build_demo around a given loader, launched on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from pipelines.loading import ModelLoader


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
