"""Look and feel: the theme, the CSS, and the captioned read-only preview image every view uses."""

from __future__ import annotations

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
@media (max-width: 760px) {
  #main-row { flex-direction: column !important; }
  #controls-col { display: contents !important; }
  #prompt-block { order: 0; }
  #result-col { order: 1; }
  #settings-block { order: 2; }
}
"""


def theme() -> gr.themes.Base:
    return gr.themes.Soft()


def captioned_image(caption: str, height: int, *, elem_id: str | None = None, **kw: Any) -> tuple[gr.Image, gr.Markdown]:
    """A read-only, pixel-crisp image with its caption *below* it (no label chip over the picture)."""
    with gr.Column(min_width=120, scale=1):
        image = gr.Image(label=caption, show_label=False, elem_classes="pixelated", format="png", height=height,
                         interactive=False, buttons=kw.pop("buttons", []), elem_id=elem_id, **kw)
        note = gr.Markdown(caption, elem_classes="caption", elem_id=f"{elem_id}-caption" if elem_id else None)
    return image, note
