"""Fair to every visitor of a public Space, tested over HTTP against `python app.py` itself (the embedded model,
default limits: PLAYGROUND_MAX_RUNS_PER_CLIENT=4) with clients told apart by their loopback address (the socket
bound to 127.0.0.x) or, behind a trusted proxy, by X-Forwarded-For."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from tests.serving import Visitor, app_process

LIMIT = 4  # PLAYGROUND_MAX_RUNS_PER_CLIENT's default
QUICK = dict(prompt="a red circle", num_inference_steps=2, seed=1)
# A sweep of 12 cells of the embedded model (20 steps each, ~0.3-0.6 s here): each one holds the worker for
# seconds, so four of them are still going when the other visitor asks.
SWEEP = dict(prompt="a red circle", seed=1, randomize_seed=False, num_inference_steps=20, sweep_x="guidance_scale",
             sweep_x_values="1,2,3,5,7.5,12", sweep_y="seed", sweep_y_values="1,2")


@pytest.fixture(scope="module")
def direct_app(tmp_path_factory):
    """python app.py with no proxy in front (PLAYGROUND_TRUSTED_PROXY_HOPS unset: 0): (url, outputs folder)."""
    outputs = tmp_path_factory.mktemp("outputs")
    with app_process(outputs) as url:
        yield url, outputs


@pytest.fixture(scope="module")
def direct(direct_app):
    return direct_app[0]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """python app.py behind one trusted proxy (as on a Space): the client is X-Forwarded-For's last entry."""
    with app_process(tmp_path_factory.mktemp("outputs"), {"PLAYGROUND_TRUSTED_PROXY_HOPS": "1"}) as url:
        yield url


def refused(answer) -> bool:
    """A join refused by admission: HTTP 422 whose validation message names the limit's variable."""
    return answer.status_code == 422 and "PLAYGROUND_MAX_RUNS_PER_CLIENT" in answer.text


def test_a_flood_of_explain_sweeps_leaves_another_address_served_in_seconds(direct):
    flooder, other = Visitor(direct, "127.0.0.2"), Visitor(direct, "127.0.0.3")
    try:
        t0 = time.perf_counter()
        answers = [flooder.join("/explain_sweep", new_session=True, **SWEEP) for _ in range(70)]
        flood_seconds = time.perf_counter() - t0
        admitted = [a for a in answers if a.status_code == 200]
        assert len(admitted) == LIMIT, [a.status_code for a in answers]
        assert all(refused(a) for a in answers if a.status_code != 200), {a.status_code for a in answers}
        assert not any(a.status_code == 503 for a in answers)  # the queue never filled
        # Another address: its run is served beside the four sweeps (the worker takes jobs in turn, cell by cell).
        t0 = time.perf_counter()
        done = other.call("/generate", **QUICK, timeout=60)
        waited = time.perf_counter() - t0
        assert done["success"], done
        assert waited < 20, f"the other visitor waited {waited:.1f} s behind the flood"
        # ... and may queue its own experiments: the flood took four slots, not the queue.
        assert other.join("/explain_jump", prompt="x", num_inference_steps=4).status_code == 200
        print(f"70 sweeps refused in {flood_seconds:.2f} s (4 admitted); the other visitor's run took {waited:.2f} s")
    finally:
        for a in answers:
            if a.status_code == 200:
                flooder.cancel("/explain_sweep", a.json()["event_id"])
        flooder.close(), other.close()


def test_forged_forwarded_headers_from_an_untrusted_peer_change_nothing(direct):
    """No proxy is trusted: eight X-Forwarded-For values from one peer are still one client."""
    visitors = [Visitor(direct, "127.0.0.4", {"X-Forwarded-For": f"203.0.113.{i}"}) for i in range(8)]
    try:
        answers = [v.join("/explain_sweep", **SWEEP) for v in visitors]  # each Visitor: its own session
        assert sum(a.status_code == 200 for a in answers) == LIMIT
        assert sum(refused(a) for a in answers) == 8 - LIMIT
    finally:
        for v, a in zip(visitors, answers):
            if a.status_code == 200:
                v.cancel("/explain_sweep", a.json()["event_id"])
            v.close()


def _run_together(visitors: list[Visitor], api_name: str, **values) -> list:
    with concurrent.futures.ThreadPoolExecutor(len(visitors)) as pool:
        return list(pool.map(lambda v: v.join(api_name, **values), visitors))


def test_visitors_behind_a_trusted_proxy_are_told_apart(proxied):
    """Eight visitors behind the proxy (one peer, eight X-Forwarded-For addresses) each get their runs; one visitor's
    eight simultaneous runs are limited to four, whatever it forges in front of the proxy's entry."""
    eight = [Visitor(proxied, "127.0.0.5", {"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(8)]
    one = [Visitor(proxied, "127.0.0.5", {"X-Forwarded-For": f"10.0.0.{i}, 192.0.2.7"}) for i in range(8)]
    try:
        answers = _run_together(eight, "/generate", **(QUICK | {"num_inference_steps": 20}))
        assert all(a.status_code == 200 for a in answers), [(a.status_code, a.text[:200]) for a in answers]
        for v, a in zip(eight, answers):
            event = a.json()["event_id"]
            assert v.results({event}, timeout=120)[event]["success"]
        answers = _run_together(one, "/explain_sweep", **SWEEP)
        assert sum(a.status_code == 200 for a in answers) == LIMIT, [a.status_code for a in answers]
        assert sum(refused(a) for a in answers) == 8 - LIMIT
        for v, a in zip(one, answers):
            if a.status_code == 200:
                v.cancel("/explain_sweep", a.json()["event_id"])
    finally:
        for v in eight + one:
            v.close()


def _result(visitor: Visitor, answer, timeout: float = 60) -> dict:
    assert answer.status_code == 200, answer.text[:300]
    event = answer.json()["event_id"]
    return visitor.results({event}, timeout)[event]


@pytest.mark.parametrize("api_name", ["/generate", "/generate_stream"])
def test_a_visitor_who_goes_away_stops_its_run_at_the_next_step(direct_app, api_name):
    """A client that closes its connection once its run has started stops that run at the next step: when the next
    visitor's run, queued behind it, is done, the 999-step run (~20 s here) either never started or stopped early."""
    url, outputs = direct_app
    leaver, other = Visitor(url, "127.0.0.6"), Visitor(url, "127.0.0.7")
    seed = 11 if api_name == "/generate" else 12
    try:
        answer = leaver.join(api_name, prompt="a red circle", num_inference_steps=999, seed=seed)
        assert answer.status_code == 200
        leaver.wait_started(answer.json()["event_id"])  # then its stream closes: the client is gone
        done = other.call("/generate", **QUICK, timeout=120)
        assert done["success"], done
        trace = _trace_of(outputs, 999, seed)
        assert trace is None or (trace["cancelled"] and len(trace["steps"]) < 999), \
            "the run of the visitor who went away went on to its end"
    finally:
        leaver.close(), other.close()


def _trace_of(outputs, steps: int, seed: int) -> dict | None:
    """The trace.json of the finished run with `steps` requested steps and `seed`, if there is one."""
    for path in outputs.glob("*/trace.json"):
        trace = json.loads(path.read_text())
        if trace["request"]["num_inference_steps"] == steps and trace["seed"] == seed:
            return trace
    return None


def test_prompt_notes_cap_the_text_before_reading_it(direct):
    """The notes under the prompt (a private event, sent on every keystroke) refuse a 10-million-character prompt
    at once with the limit's variable, instead of tokenising it (8 s and 1.3 GB before)."""
    v = Visitor(direct, "127.0.0.8")
    try:
        t0 = time.perf_counter()
        done = _result(v, v.join_raw("/prompt_notes", ["x" * 10_000_000, "", "tiny-shapes", 20]))
        seconds = time.perf_counter() - t0
        assert done["success"] and "PLAYGROUND_MAX_PROMPT_CHARS" in done["output"]["data"][0], done
        assert seconds < 5, f"{seconds:.1f} s"
    finally:
        v.close()


def test_fractions_and_empty_calls_get_a_clear_line(direct):
    v = Visitor(direct, "127.0.0.9")
    try:
        done = v.call("/explain_branch", prompt="x", num_inference_steps=4, branch_n=2.5)
        assert not done["success"] and "whole number" in done["output"]["error"], done
        for name in ("/on_model", "/on_method"):  # private events called without their data
            done = _result(v, v.join_raw(name, [None]))
            assert not done["success"] and "choose one of" in done["output"]["error"], (name, done)
        done = _result(v, v.join_raw("/prompt_notes", [None, None, "tiny-shapes", 20]))  # no prompt: an empty one
        assert done["success"] and "Empty prompt" in done["output"]["data"][0], done
        done = _result(v, v.join_raw("/prompt_notes", ["x", "", "not-a-model", 20]))  # the model list says what is allowed
        assert not done["success"] and "tiny-shapes" in done["output"]["error"], done
    finally:
        v.close()
