"""Observers receive one StepEvent per loop iteration and may cancel the run at a step boundary."""

from __future__ import annotations

import threading
import time

from pipelines.types import StepEvent


class Observer:
    """Base observer: ignores events, never cancels. Subclass and override what you need."""

    def on_step(self, event: StepEvent) -> None:
        """Called after each loop iteration, in the generating thread."""

    def is_cancelled(self) -> bool:
        """Polled after each on_step; True stops the run at this step boundary."""
        return False


class CollectingObserver(Observer):
    """Keeps every event (tests, the CLI trace); cancels after `cancel_after` events when set."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.events: list[StepEvent] = []
        self.cancel_after = cancel_after

    def on_step(self, event: StepEvent) -> None:
        self.events.append(event)

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.events) >= self.cancel_after


class TeeObserver(Observer):
    """Hands every event to several observers in order; the run stops when any of them cancels."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def on_step(self, event: StepEvent) -> None:
        for observer in self.observers:
            observer.on_step(event)

    def is_cancelled(self) -> bool:
        return any(observer.is_cancelled() for observer in self.observers)


class TimeLimit(Observer):
    """Cancels the run at the first step boundary after `seconds` of wall-clock time from its creation."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._deadline = None if seconds is None else time.perf_counter() + seconds
        self.expired = False  # set once the limit stopped the run

    def is_cancelled(self) -> bool:
        if self._deadline is not None and time.perf_counter() > self._deadline:
            self.expired = True
        return self.expired


class LatestObserver(Observer):
    """Keeps only the newest event for a consumer in another thread (the UI), dropping stale ones.

    The generating thread never blocks on the consumer: when the UI falls behind, older previews are
    simply replaced. `take(timeout)` returns the newest unseen event or None.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: StepEvent | None = None
        self._cancel = threading.Event()
        self.dropped = 0  # events replaced before anyone took them
        self.seen = 0  # events delivered by take()

    def on_step(self, event: StepEvent) -> None:
        with self._cond:
            if self._latest is not None:
                self.dropped += 1
            self._latest = event
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> StepEvent | None:
        with self._cond:
            if self._latest is None:
                self._cond.wait(timeout)
            event, self._latest = self._latest, None
            if event is not None:
                self.seen += 1
            return event

    def wake(self) -> None:
        """Wake a consumer blocked in take() (e.g. when the run ends)."""
        with self._cond:
            self._cond.notify_all()

    def cancel(self) -> None:
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()


class StepRecorder(Observer):
    """Keeps every step's tensors (first image, CPU) so a scrubber or an experiment can revisit any step.

    max_bytes bounds the tensors held: past it the recorder keeps every 2nd step, then every 4th, ... (always the
    newest), so a 1000-step run of a large model costs what ~max_bytes does, not gigabytes. None: keep all.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.steps: list[StepEvent] = []  # first image, CPU (StepEvent.first_image); thinned steps: numbers only
        self.max_bytes = max_bytes
        self.stride = 1  # tensors are kept for steps that are multiples of this (and the newest)
        self.nbytes = 0

    def on_step(self, event: StepEvent) -> None:
        record = event.first_image()
        if self.steps and self.steps[-1].kept and self.steps[-1].step % self.stride:
            self.steps[-1] = self._numbers_only(self.steps[-1])  # was kept only as the newest
        self.steps.append(record)
        self.nbytes += record.nbytes
        while self.max_bytes is not None and self.nbytes > self.max_bytes and self.stride < len(self.steps):
            self.stride *= 2
            for i, r in enumerate(self.steps[:-1]):
                if r.kept and r.step % self.stride:
                    self.steps[i] = self._numbers_only(r)

    def _numbers_only(self, record: StepEvent) -> StepEvent:
        self.nbytes -= record.nbytes
        return record.numbers_only()

    def nearest_kept(self, index: int) -> int:
        """The index of the kept step closest to `index` (earlier on a tie)."""
        if 0 <= index < len(self.steps) and self.steps[index].kept:
            return index  # the common case (every step of a short run), without a scan
        kept = [i for i, r in enumerate(self.steps) if r.kept]
        if not kept:
            raise ValueError("no step tensors were kept")
        return min(kept, key=lambda i: (abs(i - index), i))
