"""One long-lived generation thread: every run of a process goes through it, one at a time.

Why not a thread per run: torch on a *new* Python thread builds a new OpenMP team, and on a 2-core machine
the first run there was ~3x slower than on a thread that already had one (1.46 s vs 0.50 s for 20 steps of
the embedded model, measured in issue 12). One thread that lives as long as the app keeps its team warm.

The thread count of each run is measured per model and size (pipelines/threads.py, ModelLoader.threads): the
embedded model's UNet is far too small to split a convolution over cores, and the free core then renders previews
and serves HTTP without competing with the loop; with the UNet traced (pipelines/traced.py) two threads win alone
(0.26 s vs 0.29 s per run) but lose in the app, whose event loop wakes every millisecond and stalls the second
OpenMP thread at every op's barrier (/generate took 2.2x the stock call with two threads, 1.1x with one): so jobs
here run with serving=True, where N threads must win by a wide margin.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

import torch

from pipelines.generate import generate

T = TypeVar("T")


class GenerationWorker:
    """Runs submitted jobs in order on one daemon thread that is started on first use and then kept."""

    def __init__(self, name: str = "generation-worker") -> None:
        self.name = name
        self.default_threads = torch.get_num_threads()  # torch's own choice, for large models
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queue `job` and return its Future; its exceptions are set on the Future, the worker keeps going."""
        future: Future[T] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put((job, future))
        return future

    def run(self, job: Callable[[], T]) -> T:
        """submit(job) and wait for its result (or its exception)."""
        return self.submit(job).result()

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread (None before the first job): tests check that runs happen there."""
        return self._thread

    def close(self) -> None:
        """Let the thread finish the queued jobs and exit."""
        self._jobs.put(None)

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)


def load_here(worker: GenerationWorker, request, *, loader):
    """Inside a job of `worker`: load the request's model and set torch's thread count for its size
    (ModelLoader.threads, serving); returns the loaded pipeline."""
    pipe = loader.get(request.model)
    choice = loader.threads(request.model, request.height, request.width, serving=True, default=worker.default_threads,
                            images=request.num_images_per_prompt)
    torch.set_num_threads(choice.threads)
    return pipe


def generate_here(worker: GenerationWorker, request, observer=None, *, loader):
    """generate(request, observer) inside a job of `worker`, with torch's thread count chosen for the model."""
    load_here(worker, request, loader=loader)
    return generate(request, observer, loader=loader)


def generate_on(worker: GenerationWorker, request, observer=None, *, loader) -> Future:
    """generate_here(...) as a job on `worker`."""
    return worker.submit(lambda: generate_here(worker, request, observer, loader=loader))
