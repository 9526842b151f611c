"""Who the client is (behind trusted proxies only as far as told) and how admission counts a client's events from
queued to finished (ui/clients.py); and fair retention: one client's runs and Explain folders cannot evict
another's (ui/state.py)."""

from __future__ import annotations

import time

import pytest

from pipelines.limits import Limits
from pipelines.loading import ModelLoader
from pipelines.outputs import run_folders
from pipelines.requests import build_request
from tests.tiny import tiny_pipeline
from ui import state
from ui.clients import Admission, client_address


@pytest.mark.parametrize("peer, forwarded, hops, expected", [
    ("127.0.0.1", "203.0.113.9", 0, "127.0.0.1"),  # no proxy trusted: the header is never read
    ("10.16.0.1", "203.0.113.9", 1, "203.0.113.9"),  # a Space: its proxy appended what it saw
    ("10.16.0.1", "6.6.6.6, 203.0.113.9", 1, "203.0.113.9"),  # what the client forged in front stays untrusted
    ("10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.1", 2, "203.0.113.9"),  # two proxies
    ("10.16.0.1", None, 1, "10.16.0.1"),  # no header: the peer
    ("10.16.0.1", "203.0.113.9", 3, "203.0.113.9"),  # fewer entries than hops: the leftmost
    ("10.16.0.1", " 2001:DB8::1 ", 1, "2001:db8::1"),  # normalised
    ("10.16.0.1", "x" * 500, 1, "x" * 64),  # not an address: itself, cut
])
def test_client_address(peer, forwarded, hops, expected):
    assert client_address(peer, forwarded, hops) == expected


def test_admission_counts_from_queued_to_finished_and_lapses():
    now = [0.0]
    admission = Admission(2, reserve_seconds=30, clock=lambda: now[0])
    admission.reserve("a")
    admission.reserve("a")
    with pytest.raises(ValueError, match="PLAYGROUND_MAX_RUNS_PER_CLIENT=2"):
        admission.reserve("a")  # two queued: the third is refused when it is queued
    admission.reserve("b")  # another client is not affected
    with admission.hold("a"):  # the first starts: its reservation becomes a hold, still two in all
        assert admission.count("a") == 2
        with pytest.raises(ValueError):
            admission.reserve("a")
    assert admission.count("a") == 1  # it finished
    now[0] = 31.0  # the other queued event never started (cancelled in the queue): its reservation lapses
    assert admission.count("a") == 0
    with admission.hold("a"), admission.hold("a"):  # handlers without a reservation are checked themselves
        with pytest.raises(ValueError):
            with admission.hold("a"):
                pass
    assert admission.count("a") == 0
    assert Admission(None).count("a") == 0  # no limit


def test_one_clients_runs_and_experiments_cannot_evict_anothers(tmp_path, monkeypatch):
    loader = ModelLoader(device="cpu")
    loader.add("tiny", tiny_pipeline("sd"))
    limits = Limits(max_runs_kept=5)
    app = state.Playground(loader, ["tiny"], "tiny", tmp_path, 0.05, limits=limits)
    request = build_request(prompt="x", model="tiny", loader=loader, num_inference_steps=2, seed=1, limits=limits)

    def run(client):
        r = app.start(request, "fast", None, client)
        assert r.done.wait(60) and r.error is None, r.error
        return r.folder.name

    theirs = run("203.0.113.1")
    mine = [run("203.0.113.2") for _ in range(state.MAX_RUNS_IN_MEMORY + 6)]
    app.worker.run(lambda: None)  # retention runs on the worker after each run is done: let the last one finish
    names = {r.path.name for r in run_folders(tmp_path) if r.finished}
    assert theirs in names  # not evicted by the other client's fourteen
    # The runs held in memory for scrubbing stay too (they may be on someone's screen); the busy client's oldest went.
    assert len(names) <= state.MAX_RUNS_IN_MEMORY + 1
    assert mine[0] not in names and mine[-1] in names
    # Explain folders: the busy client keeps at most EXPERIMENTS_KEPT_PER_CLIENT and never evicts the other's.
    other = app.experiment_folder("203.0.113.1")
    other.mkdir(parents=True)
    (other / "a.png").write_bytes(b"png")
    made = []
    for _ in range(state.EXPERIMENTS_KEPT_PER_CLIENT + 5):
        folder = app.experiment_folder("203.0.113.2")
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(b"png")
        made.append(folder)
        time.sleep(0.01)  # distinct modification times
    left = {p.name for p in (tmp_path / "explain").iterdir()}
    assert other.name in left
    assert len(left & {f.name for f in made}) <= state.EXPERIMENTS_KEPT_PER_CLIENT
    assert made[-1].name in left and made[0].name not in left
