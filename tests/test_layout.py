"""The page's layout and progress (issue 23, item 7), in Chromium against the real app around a tiny real pipeline:
labels and numbers whole, captions true after Stop and after a restore, the result on screen after a run on a
390-px phone, and progress bars that count a run's steps and an experiment's runs. The bars' HTML and the
experiments' counts are checked on their own too, on real reports of the embedded model."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from pipelines import explain
from pipelines.loading import ModelLoader
from pipelines.requests import build_request, missing_embedded
from pipelines.types import DEFAULT_MODEL
from tests.serving import serve, wait_until
from tests.tiny import tiny_pipeline
from ui.explain import branch_progress, dissect_progress, jump_progress, sweep_progress, tradeoff_progress
from ui.live import final_caption
from ui.theme import progress_html

MODEL = "tiny-sd"
BAR = re.compile(r'<div class="progress-line (\w+)"><progress(?: value="([\d.]+)" max="([\d.]+)")?[^>]*></progress>'
                 r'<span class="progress-text">([^<]*)</span></div>')


def bar(html: str) -> tuple[str, float | None, float | None, str]:
    """(state, value, max, text) of a progress_html bar; value and max None when it is indeterminate."""
    m = BAR.fullmatch(html)
    assert m, html
    state, value, top, text = m.groups()
    return state, None if value is None else float(value), None if top is None else float(top), text


# -- the bar and the captions on their own ------------------------------------------------------------------------

def test_progress_html_is_a_bar_at_its_fraction_with_what_it_counts():
    assert bar(progress_html(3, 10, "step 3 / 10")) == ("running", 3.0, 10.0, "step 3 / 10")
    assert bar(progress_html(12, 10, "x", "done"))[1:3] == (10.0, 10.0)  # never past its end
    assert bar(progress_html(None, 1, "not started yet")) == ("running", None, None, "not started yet")
    assert bar(progress_html(1, 2, "<b>"))[3] == "&lt;b&gt;"  # text is text, never markup
    with pytest.raises(ValueError, match="running, done or stopped"):
        progress_html(1, 2, "x", "paused")
    with pytest.raises(ValueError, match="above 0"):
        progress_html(0, 0, "x")


def test_final_caption_says_what_a_stopped_run_shows():
    assert final_caption(False, 30) == "Final image"
    assert final_caption(True, 7) == "Stopped at step 7 — x̂0 shown"
    assert "starting noise" in final_caption(True, 0)


@pytest.fixture(scope="module")
def embedded() -> ModelLoader:
    if missing_embedded(DEFAULT_MODEL) is not None:
        pytest.skip("embedded model not installed")
    return ModelLoader(device="cpu")


def _request(loader, **kw):
    return build_request(prompt="a large red circle in the center", model=DEFAULT_MODEL, loader=loader, seed=1,
                         num_inference_steps=3, **kw)


def test_experiment_bars_count_runs_and_end_full(embedded):
    """Each report's bar: the fraction of the experiment's runs (or cells) done, rising to total/total at the end."""
    request = _request(embedded)
    jumps = list(explain.jump(request, loader=embedded, short_steps=[1, 2]))
    assert [bar(jump_progress(r))[1:] for r in jumps] == [(1, 3, "1 / 3 runs"), (2, 3, "2 / 3 runs"),
                                                           (3, 3, "3 / 3 runs")]
    assert bar(jump_progress(jumps[-1]))[0] == "done" and bar(jump_progress(jumps[0]))[0] == "running"
    # While the full run's x̂0 are decoded, it counts by the fraction decoded.
    decoding = dataclasses.replace(jumps[0], steps=jumps[0].steps[:2], decoding=True, done=False)
    state, value, top, text = bar(jump_progress(decoding))
    assert (value, top, text) == (pytest.approx(2 / 3, abs=1e-4), 3, "run 1 of 3: x̂0 decoded 2 / 3")

    branches = list(explain.branch(request, [0.3, 0.6], 2, loader=embedded))
    assert bar(branch_progress(None, 5, 2))[1:] == (0, 5, "0 / 5 runs")
    assert [bar(branch_progress(r, 5, 2))[1:3] for r in branches] == [(3, 5), (5, 5)]
    assert bar(branch_progress(branches[-1], 5, 2))[0] == "done"

    x = explain.parse_axis("guidance_scale=1,3")
    cells = list(explain.sweep(request, x, None, loader=embedded))
    assert [bar(sweep_progress(len(r.cells), r.total, r.done)) for r in cells] == [
        ("running", 1, 2, "1 / 2 cells"), ("done", 2, 2, "2 / 2 cells")]

    dissected = explain.finish(explain.dissect(request, loader=embedded))
    assert bar(dissect_progress(dissected)) == ("done", 3, 3, "3 / 3 steps decoded")
    partial = dataclasses.replace(dissected, steps=dissected.steps[:1], decoding=True, done=False)
    assert bar(dissect_progress(partial)) == ("running", 1, 3, "x̂0 decoded 1 / 3")

    points = list(explain.tradeoff(request, [1, 3], 2, loader=embedded))
    assert [bar(tradeoff_progress(r, 4, 2))[1:] for r in points] == [(2, 4, "2 / 4 runs"), (4, 4, "4 / 4 runs")]


# -- the page ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app around the tiny SD pipeline on a free port: yields its URL."""
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    with serve(loader, tmp_path_factory.mktemp("outputs"), models=[MODEL], preview_interval=0.05) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield b
        b.close()


def _page(browser, url: str, width: int = 1440, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})  # its own context: its own history
    page.goto(url)
    page.wait_for_selector("#history")
    return page


def _set(page, label: str, value) -> None:
    box = page.get_by_label(label).first
    box.fill(str(value))
    box.press("Enter")


def _generate(page, prompt: str, steps: int) -> None:
    page.locator("#prompt-block textarea").first.fill(prompt)
    _set(page, "Steps", steps)
    page.get_by_label("Fast preview").check()  # cheap previews: their rate does not hang on CPU load
    page.locator("#prompt-block").get_by_role("button", name="Generate").click()


def _wait_status(page, start: str, timeout: float = 60) -> str:
    status = page.locator("#live-status")
    try:
        wait_until(lambda: status.inner_text().startswith(start), timeout, f"the status line to start with {start!r}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it says {status.inner_text()!r}") from None
    return status.inner_text()


def _bar_on_page(page, selector: str) -> tuple[str, float | None, float | None, str] | None:
    """The bar in `selector` as the browser shows it, None while it is empty."""
    return page.evaluate("""sel => {
        const p = document.querySelector(sel + ' progress');
        if (!p) return null;
        const line = p.closest('.progress-line');
        const state = ['running', 'done', 'stopped'].find(s => line.classList.contains(s));
        return [state, p.hasAttribute('value') ? p.value : null, p.hasAttribute('value') ? p.max : null,
                line.querySelector('.progress-text').innerText];
    }""", selector)


def test_browser_run_progress_counts_steps_to_the_end(server, browser):
    """The bar shows step k of N while a run goes, only ever forward, and ends at N of N with the status's count."""
    page = _page(browser, server)
    _generate(page, "a red circle", 250)
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not page.locator("#live-status").inner_text().startswith("Done"):
        shown = _bar_on_page(page, "#live-progress")
        if shown and shown[1] is not None:
            seen.append(shown)
        time.sleep(0.03)
    done = _wait_status(page, "Done")
    n = int(re.match(r"Done: (\d+) steps", done).group(1))  # PNDM: N + 1 iterations
    assert _bar_on_page(page, "#live-progress") == ["done", n, n, f"step {n} / {n}"]
    mid = [s for s in seen if s[0] == "running" and 0 < s[1] < s[2]]
    assert mid, f"no bar between the first and the last step was seen: {seen[:5]}"
    for state, value, top, text in mid:
        assert top == n and text == f"step {int(value)} / {n}"
    values = [s[1] for s in mid]
    assert values == sorted(values), values
    page.close()


def test_browser_stop_captions_and_restore_are_true(server, browser):
    """After Stop the final image is captioned as the x̂0 of the step the run stopped at, and the bar stops there; the
    next run's image is a final image again; restoring the stopped run brings its caption back."""
    page = _page(browser, server)
    _generate(page, "a blue square", 500)
    _wait_status(page, "Step")
    page.locator("#prompt-block").get_by_role("button", name="Stop").click()
    stopped = _wait_status(page, "Stopped at step")
    k, n = map(int, re.match(r"Stopped at step (\d+) of (\d+)", stopped).groups())
    assert 0 < k < n
    caption = page.locator("#final-image-caption")
    wait_until(lambda: caption.inner_text().strip() == f"Stopped at step {k} — x̂0 shown", 10,
               f"the caption to say the run stopped at step {k} (it says {caption.inner_text()!r})")
    assert _bar_on_page(page, "#live-progress") == ["stopped", k, n, f"stopped at step {k} / {n}"]

    _generate(page, "a blue square", 3)
    _wait_status(page, "Done")
    assert caption.inner_text().strip() == "Final image"

    # Both runs in the history: the second run's stream has ended (its follow-up event fills the gallery), so no
    # late update of that stream lands on the restored run.
    thumbs = page.locator("#history button.thumbnail-item")
    wait_until(lambda: thumbs.count() == 2, 20, "both runs in the history")
    item = page.locator("#history button.thumbnail-item", has_text="stopped")
    item.first.click()
    _wait_status(page, "Restored")
    wait_until(lambda: caption.inner_text().strip() == f"Stopped at step {k} — x̂0 shown", 10,
               "the restored stopped run's caption")
    assert _bar_on_page(page, "#live-progress") is None  # a restore is not a run: no bar left from the last one
    page.close()


def test_browser_labels_and_numbers_whole(server, browser):
    """The Width slider shows 4096 whole (its box and its max label), a restored scheduler's text stops before the
    dropdown's arrow, and the Past runs label is above the first thumbnail, not over it."""
    page = _page(browser, server)
    _set(page, "Width", 4096)
    page.locator("#prompt-block textarea").first.click()  # blurred: the box as it is read, without its spinner
    whole = page.evaluate("""() => {
        const input = document.querySelector('input[aria-label="number input for Width"]');
        const block = input.closest('.block');
        const max = block.querySelector('[data-testid=max-value]');
        const s = getComputedStyle(input);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = s.font;
        const room = input.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight);
        const b = block.getBoundingClientRect(), m = max.getBoundingClientRect();
        return {value: input.value, text: ctx.measureText(input.value).width, room,
                max: max.innerText, maxLeft: m.left, maxRight: m.right, left: b.left, right: b.right};
    }""")
    assert whole["value"] == "4096" and whole["text"] <= whole["room"], whole
    assert whole["max"] == "4096" and whole["left"] <= whole["maxLeft"] and whole["maxRight"] <= whole["right"], whole

    _set(page, "Width", 0)  # the model's own size: 4096 wide is over the tiny model's pixel budget
    _generate(page, "a green star", 2)
    _wait_status(page, "Done")
    thumb = page.locator("#history button.thumbnail-item").first
    thumb.wait_for(timeout=20000)
    label = page.locator("#history [data-testid=block-label]").bounding_box()
    assert label["y"] + label["height"] <= thumb.bounding_box()["y"] + 0.5, (label, thumb.bounding_box())

    thumb.click()
    _wait_status(page, "Restored")
    dropdown = page.get_by_label("Scheduler", exact=True)
    dropdown.scroll_into_view_if_needed()
    fits = dropdown.evaluate("""input => {
        const arrow = input.closest('.wrap-inner').querySelector('.icon-wrap').getBoundingClientRect();
        const r = input.getBoundingClientRect(), s = getComputedStyle(input);
        return {value: input.value, textRight: r.right - parseFloat(s.paddingRight), arrowLeft: arrow.left,
                ellipsis: s.textOverflow};
    }""")
    assert fits["value"] and fits["textRight"] <= fits["arrowLeft"] and fits["ellipsis"] == "ellipsis", fits
    page.close()


def test_browser_phone_shows_the_result_after_a_run(server, browser):
    """On a 390×844 phone the final image (and its caption) is on screen once a run is done, without scrolling."""
    page = _page(browser, server, 390, 844)
    _generate(page, "a small yellow heart at the bottom", 5)
    _wait_status(page, "Done")
    final = page.locator("#final-image")
    wait_until(lambda: final.locator("img").count() > 0, 10, "the final image to be shown")
    for element in (final, page.locator("#final-image-caption")):
        box = element.bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 844, box
    page.close()


def test_browser_experiment_progress_counts_cells(server, browser):
    """An Explain-lab sweep's bar moves through its cells and ends at all of them."""
    page = _page(browser, server)
    page.locator("#prompt-block textarea").first.fill("a red circle")
    page.get_by_role("tab", name="Sweep grid").click()
    page.get_by_label("x values").fill("1,3,5,7")
    page.get_by_label("y values").fill("20,40")
    page.get_by_role("button", name="Run sweep").click()
    status = page.locator("#explain-sweep-status")
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not status.inner_text().startswith("Done"):
        shown = _bar_on_page(page, "#explain-sweep-progress")
        if shown:
            seen.append(shown)
        time.sleep(0.03)
    wait_until(lambda: status.inner_text().startswith("Done"), 10, "the sweep to finish")
    assert _bar_on_page(page, "#explain-sweep-progress") == ["done", 8, 8, "8 / 8 cells"]
    mid = [s[1] for s in seen if s[0] == "running" and s[1] is not None and 0 < s[1] < 8]
    assert mid and mid == sorted(mid), seen
    page.close()
