"""Observers receive one StepEvent per loop iteration and may cancel the run at a step boundary."""

from __future__ import annotations

import threading
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
