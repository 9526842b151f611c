"""Who is asking, and how much each asker has going: the client address (behind trusted proxies, from
X-Forwarded-For) and per-client admission counted from the moment an event is queued until its handler ends.

Why from the queue: Gradio queues an event before its handler runs, and a limit checked only when a handler starts
let one address queue 65 Explain sweeps and fill the queue (max 64) for everyone. Gradio calls an event's
`validator` when the event is pushed, before it is queued: there `Admission.reserve` counts it and refuses the
excess at once; the handler turns the reservation into a hold (`Admission.hold`) for as long as it runs. A queued
event that never starts (cancelled, its client gone) leaves a reservation that lapses after RESERVE_SECONDS: model
events have concurrency limits high enough that they leave Gradio's queue within moments and wait on the
generation worker instead, where they are counted as held.

No Gradio here: `http` is anything with Gradio's gr.Request shape (`.client.host`, `.headers`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

RESERVE_SECONDS = 30.0  # a reservation whose event has not started by then lapses
ADDRESS_CHARS = 64  # a forwarded "address" longer than this is not one


def client_address(peer: str | None, forwarded_for: str | None, hops: int) -> str | None:
    """The client's address. hops = 0: the TCP peer, whatever X-Forwarded-For says (a header anyone can send).
    hops = N ≥ 1: the server sits behind N trusted proxies, each appending the address it saw to X-Forwarded-For,
    so the client is the N-th entry from the right (what the outermost trusted proxy saw); entries further left were
    sent by the client and are never trusted. With fewer entries than N (or no header), the leftmost entry, else
    the peer. An entry that is not an IP address stands for itself (cut to ADDRESS_CHARS)."""
    if hops <= 0 or not forwarded_for:
        return peer
    entries = [e.strip() for e in forwarded_for.split(",") if e.strip()]
    if not entries:
        return peer
    entry = entries[-hops] if len(entries) >= hops else entries[0]
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return entry[:ADDRESS_CHARS]


def request_address(http: Any, hops: int) -> str | None:
    """client_address() of a gr.Request (None when called without one, e.g. from Python)."""
    client = getattr(http, "client", None)
    peer = getattr(client, "host", None) if client is not None else None
    headers = getattr(http, "headers", None)
    forwarded = None
    if headers is not None:
        getlist = getattr(headers, "getlist", None)  # several X-Forwarded-For lines read as one list
        values = getlist("x-forwarded-for") if getlist is not None else [headers.get("x-forwarded-for")]
        forwarded = ", ".join(v for v in values if v) or None
    return client_address(peer, forwarded, hops)


class Admission:
    """Per-client count of model-running events queued (reserved) or running (held); refuses past `limit`."""

    def __init__(self, limit: int | None, reserve_seconds: float = RESERVE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit  # None: no limit
        self.reserve_seconds = reserve_seconds
        self.clock = clock
        self._held: dict[str, int] = {}
        self._reserved: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def count(self, client: str | None) -> int:
        """Events of `client` queued or running now."""
        with self._lock:
            return self._count(client, self.clock())

    def _count(self, client: str | None, now: float) -> int:
        if client is None:
            return 0
        queued = self._reserved.get(client)
        while queued and queued[0] < now - self.reserve_seconds:
            queued.popleft()
        if queued is not None and not queued:
            del self._reserved[client]
            queued = None
        return self._held.get(client, 0) + (len(queued) if queued else 0)

    def _refuse(self, n: int) -> ValueError:
        return ValueError(
            f"You already have {n} run{'s' if n != 1 else ''} or experiment{'s' if n != 1 else ''} waiting or "
            f"running, the most one visitor may have at once here (PLAYGROUND_MAX_RUNS_PER_CLIENT={self.limit}); "
            f"wait for one to finish or press Stop.")

    def reserve(self, client: str | None) -> None:
        """Count an event being queued (Gradio's validator); ValueError when the client is at its limit."""
        if client is None or self.limit is None:
            return
        with self._lock:
            now = self.clock()
            n = self._count(client, now)
            if n >= self.limit:
                raise self._refuse(n)
            self._reserved.setdefault(client, deque()).append(now)

    @contextlib.contextmanager
    def hold(self, client: str | None) -> Iterator[None]:
        """Count a running handler while it lasts. It takes over its event's reservation; a handler that came
        without one (called from Python, or queued longer than RESERVE_SECONDS) is checked against the limit."""
        if client is None or self.limit is None:
            yield
            return
        with self._lock:
            now = self.clock()
            n = self._count(client, now)
            queued = self._reserved.get(client)
            if queued:
                queued.popleft()
            elif n >= self.limit:
                raise self._refuse(n)
            self._held[client] = self._held.get(client, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._held[client] -= 1
                if not self._held[client]:
                    del self._held[client]
