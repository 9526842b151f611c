"""Look and feel: the theme, the CSS, the captioned read-only preview image every view uses, and the progress bar
of runs and experiments."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

# Labels never sit on a picture: a small object "in the top left" must stay visible, so every image is shown
# without Gradio's label chip and captioned below (captioned_image), and gallery captions are moved below
# their thumbnails. On a phone the controls column is unpacked (display: contents) so the result can be
# ordered right below the Generate button, before the long list of settings.
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
.pixelated img { width: 100%; height: 100%; object-fit: contain; }
#live-status { min-height: 2.2em; }
#live-status.error-status, #live-status .error-status { color: var(--error-text-color, #b91c1c); }
.step-note { font-size: 0.9em; opacity: 0.85; }
.caption { font-size: 0.85em; text-align: center; margin-top: 4px; opacity: 0.9; line-height: 1.3; }
.caption p { margin: 0; }
#history .caption-label { position: static !important; background: none !important; color: inherit !important;
  white-space: normal !important; font-size: 0.75em; padding: 2px 0 0 0 !important; max-width: 100% !important; }
#history .thumbnail-item { flex-direction: column; height: auto !important; }
footer { display: none !important; }
/* Labels and numbers whole. A slider's track had a 112-px minimum, so in a half-width slider (Width | Height) it
   pushed the max label out of its box ("409" for 4096); the number box holds five digits next to its spinner. */
input[type=range] { min-width: 0 !important; }
input[data-testid=number-input] { min-width: calc(5ch + 36px); }
/* A long choice (the scheduler's "model default — deterministic, …" after a restore) ends in "…" before the
   dropdown's arrow instead of running under it. */
.wrap-inner .secondary-wrap > input { padding-right: 28px; text-overflow: ellipsis; }
/* The gallery's label chip sits in the flow above the thumbnails, not over the first one. */
#history > label[data-testid=block-label], #batch > label[data-testid=block-label] {
  position: static !important; margin-bottom: 4px; }
#history .grid-wrap { height: calc(100% - 36px) !important; }
#history .grid-container, #batch .grid-container { padding-top: 0 !important; }
#batch .caption-label { position: static !important; background: none !important; color: inherit !important;
  white-space: normal !important; font-size: 0.8em; padding: 2px 0 0 0 !important; max-width: 100% !important; }
#batch .thumbnail-item { flex-direction: column; height: auto !important; }
/* Progress of a run or an experiment: a bar and what it counts, its height kept while empty so nothing moves. */
.run-progress { min-height: 1.5em; }
.run-progress .html-container { padding: 0 !important; }
.progress-line { display: flex; align-items: center; gap: 10px; font-size: 0.85em; }
.progress-line progress { -webkit-appearance: none; appearance: none; flex: 1 1 auto; min-width: 80px; height: 8px;
  border: none; border-radius: 4px; overflow: hidden; background: var(--neutral-200, #e5e7eb); }
.progress-line progress::-webkit-progress-bar { background: var(--neutral-200, #e5e7eb); }
.progress-line progress::-webkit-progress-value { background: var(--primary-500, #6366f1); }
.progress-line progress::-moz-progress-bar { background: var(--primary-500, #6366f1); }
.progress-line.stopped progress::-webkit-progress-value { background: var(--error-text-color, #b91c1c); }
.progress-line.stopped progress::-moz-progress-bar { background: var(--error-text-color, #b91c1c); }
.progress-line progress:indeterminate { animation: progress-unknown 1.2s linear infinite; background-size: 200% 100%;
  background-image: linear-gradient(90deg, var(--neutral-200, #e5e7eb) 30%, var(--primary-300, #a5b4fc) 50%,
  var(--neutral-200, #e5e7eb) 70%); }
.progress-line progress:indeterminate::-webkit-progress-bar { background: transparent; }
@keyframes progress-unknown { from { background-position: 100% 0; } to { background-position: -100% 0; } }
.progress-line .progress-text { flex: 0 1 auto; white-space: nowrap; opacity: 0.85; }
@media (max-width: 760px) {
  #main-row { flex-direction: column !important; }
  #controls-col { display: contents !important; }
  #prompt-block { order: 0; }
  #result-col { order: 1; }
  #settings-block { order: 2; }
  /* After a run the result is on screen without scrolling: x̂0 and the final image come first, side by side,
     and Generate and Stop share a line. */
  #live-x0-block { order: -2; }
  #final-image-block { order: -1; }
  #prompt-block .row { flex-wrap: nowrap !important; }
  #prompt-block .row > button { min-width: 0 !important; }
}
"""

# On a phone, bring the final image into view when it changes (a run starts or ends, a past run is restored): the
# smallest scroll that shows it whole, none when it already is; a desktop is never scrolled.
RESULT_INTO_VIEW_JS = """() => {
  if (!window.matchMedia('(max-width: 760px)').matches) return;
  requestAnimationFrame(() => {
    const el = document.getElementById('final-image-block');  // the image and its caption
    if (!el) return;
    const r = el.getBoundingClientRect();
    if (r.top < 0 || r.bottom > window.innerHeight) el.scrollIntoView({block: 'nearest'});
  });
}"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft()


def captioned_image(caption: str, height: int, *, elem_id: str | None = None, **kw: Any) -> tuple[gr.Image, gr.Markdown]:
    """A read-only, pixel-crisp image with its caption *below* it (no label chip over the picture)."""
    with gr.Column(min_width=120, scale=1, elem_id=f"{elem_id}-block" if elem_id else None):
        image = gr.Image(label=caption, show_label=False, elem_classes="pixelated", format="png", height=height,
                         interactive=False, buttons=kw.pop("buttons", []), elem_id=elem_id, **kw)
        note = gr.Markdown(caption, elem_classes="caption", elem_id=f"{elem_id}-caption" if elem_id else None)
    return image, note


def progress_bar(elem_id: str) -> gr.HTML:
    """An empty progress bar, filled by sending it progress_html(...)."""
    return gr.HTML("", elem_id=elem_id, elem_classes="run-progress", padding=False)


def progress_html(done: float | None, total: float, text: str, state: str = "running") -> str:
    """The bar at done/total with `text` beside it. done=None: how far is not known yet (an indeterminate bar).
    state: "running", "done" or "stopped" (shown in another colour)."""
    if state not in ("running", "done", "stopped"):
        raise ValueError(f"progress state must be running, done or stopped; got {state!r}")
    if not total > 0:
        raise ValueError(f"a progress bar's total must be above 0; got {total!r}")
    if done is None:
        bar = f'<progress aria-label="{html.escape(text)}"></progress>'
    else:
        value = min(max(float(done), 0.0), float(total))
        bar = f'<progress value="{value:g}" max="{float(total):g}" aria-label="{html.escape(text)}"></progress>'
    return f'<div class="progress-line {state}">{bar}<span class="progress-text">{html.escape(text)}</span></div>'
