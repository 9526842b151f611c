"""Honest sliders: the value on screen is the value a run uses, and a typed value outside a slider's range is refused
with the range, never clamped out of sight.

Gradio's slider has a number box beside it. When that box loses focus, Gradio's page clamps what was typed into the
slider's range (15 into a 0–8 guidance scale becomes 8, 1001 steps become 1000), so the run that follows uses a
value the user did not choose. KEEP_TYPED_JS keeps the typed value and KEEP_TYPED_CSS marks it; the server then
refuses it in StrictSlider.preprocess with the control's name and its range (Gradio's own refusal, "Value 15 is
greater than maximum value 8.", names neither the control nor the lower bound).
"""

from __future__ import annotations

import gradio as gr

# A capture listener on the document runs before the box's own blur handler (Gradio's clamp) and stops it when the
# typed value is outside the box's min / max; a value inside the range, or an empty box, is left to Gradio.
KEEP_TYPED_JS = """
(() => {
  document.addEventListener("blur", (e) => {
    const box = e.target;
    if (!(box instanceof HTMLInputElement) || box.type !== "number" || box.dataset.testid !== "number-input") return;
    const value = box.valueAsNumber, min = parseFloat(box.min), max = parseFloat(box.max);
    if (Number.isNaN(value) || !(value < min || value > max)) return;
    e.stopImmediatePropagation();  // Gradio's handler would clamp the value into the range without a word
    box.title = `allowed: ${box.min} to ${box.max}`;
  }, true);
})();
"""
KEEP_TYPED_CSS = """
input[data-testid="number-input"]:out-of-range {
  /* inside the box (its container clips an outline); !important: over Gradio's theme */
  box-shadow: inset 0 0 0 2px #dc2626 !important; color: #dc2626 !important; background: #fef2f2 !important;
}
"""
HEAD = f"<script>{KEEP_TYPED_JS}</script><style>{KEEP_TYPED_CSS}</style>"  # for launch(head=...)


def range_text(low: float, high: float) -> str:
    """'1 to 1000', '0 to 8', '0 to 0.5': a slider's range as it reads on the page."""
    return f"{low:g} to {high:g}"


class StrictSlider(gr.Slider):
    """gr.Slider that refuses a value outside its range (as the session last set it, e.g. per model) with the
    control's label and range. Drawn as a gr.Slider (is_template)."""

    is_template = True

    def preprocess(self, payload: float | None) -> float | None:
        if payload is not None and not self.minimum <= payload <= self.maximum:
            label = self.label or "this value"
            raise gr.Error(f"{label} must be from {range_text(self.minimum, self.maximum)}, got {payload:g}; "
                           f"nothing was run (the box keeps what you typed, in red)", print_exception=False)
        return super().preprocess(payload)
