"""The controls view: prompt, model, scheduler, steps, guidance, seed, size, preview choice. It owns its widgets,
maps them to a request by keyword (pipelines.requests.build_request), and keeps its own choices in step with
the chosen model (scheduler list, recommended steps and guidance, the useful guidance range, prompt notes)."""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

from guidance.registry import METHODS
from pipelines.families import family_of
from pipelines.limits import ENV_VARS
from pipelines.loading import hub_offline, is_available_offline
from pipelines.profile import Recommended, size_note
from pipelines.prompts import prompt_notes as notes_on_prompt
from pipelines.registry import MODELS, model_vocabulary, resolve, tier_of
from pipelines.requests import (OWN_SCHEDULER, build_request, max_batch, native_size, recommended, text_field,
                                whole_number)
from pipelines.types import DEFAULT_MODEL, MAX_SIDE, MAX_STEPS, GenerationRequest
from ui.render import display_source
from ui.sliders import StrictSlider
from ui.state import Playground

# The embedded model knows only its world's words (shapes/world.py): 5 shapes, 8 colours, small/large, a 3x3 grid.
EXAMPLE_PROMPTS = [
    ["a large red circle in the center"],
    ["a small blue star in the top left"],
    ["a yellow heart at the bottom"],
    ["a large green triangle on the right"],
    ["a small purple square above an orange circle"],
]
X0_CHOICES = [("Auto", "auto"), ("VAE decode", "decode"), ("Fast preview", "fast")]
# Ctrl/Cmd+Enter in the prompt or negative prompt clicks Generate (AUTOMATIC1111's habit; Gradio's Shift+Enter in the
# prompt stays), once per press; the buttons say so in their tooltips. A page <script> (app.py adds it to the head).
KEYS_JS = """
(() => {
  const tips = {"generate-btn": "Generate (Ctrl/Cmd+Enter or Shift+Enter in the prompt)",
                "reuse-seed": "Reuse the last run's seed (and untick Random seed)"};
  const label = () => {
    for (const [id, tip] of Object.entries(tips)) {
      const el = document.getElementById(id);
      if (el && el.title !== tip) el.title = tip;
    }
    const reuse = document.getElementById("reuse-seed");  // a screen reader says more than "recycling symbol"
    if (reuse && !reuse.hasAttribute("aria-label")) reuse.setAttribute("aria-label", "♻ reuse the last run's seed");
  };
  new MutationObserver(label).observe(document.documentElement, {childList: true, subtree: true});
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey) || e.isComposing || e.repeat) return;
    const block = document.getElementById("prompt-block");
    const button = document.getElementById("generate-btn");
    if (!block || !button || !block.contains(e.target) || !e.target.matches("textarea, input")) return;
    e.preventDefault();
    e.stopPropagation();  // Gradio's own Enter handling (a one-line box submits) never sees it
    button.click();
  }, true);
})();
"""


# What the widgets show for a model whose settings are not known before it loads (a folder outside the registry).
UNKNOWN = Recommended(20, 7.5, None)


def known_settings(model: str, loader) -> Recommended:
    """The model's recommended settings where they are known without loading it (registry models, loaded models),
    else UNKNOWN; the request builder fills unset values from the same profile."""
    if model in MODELS or loader.loaded(model) is not None:
        try:
            return recommended(model, loader)
        except ValueError:
            pass
    return UNKNOWN


def batch_limit(app: Playground, model: str, steps: int) -> int:
    """The batch slider's maximum for `model`: the largest batch its work budget allows at its native size and
    `steps` (pipelines/requests.py max_batch; the request builder checks the batch actually asked for)."""
    pipe = app.loader.loaded(model)
    try:
        side = native_size(model, pipe) if pipe is not None or model in MODELS else 512
    except (KeyError, ValueError):
        side = 512
    return max_batch(tier_of(model, pipe), app.loader.device.type, side, steps, app.limits)


def guidance_range(recommended_scale: float) -> tuple[float, float]:
    """The guidance-scale slider's range: 0 to ~2.5× the model's recommended scale (0–3 for guidance-free distilled
    models such as SD-Turbo), so the useful part of the slider is most of it. The API accepts more."""
    return 0.0, float(max(3, math.ceil(2.5 * recommended_scale), recommended_scale))


def model_label(model: str) -> str:
    """Dropdown label: hub models that are not on this machine say so (a run fetches them where there is network)."""
    if is_available_offline(model):
        return model
    return f"{model} (not downloaded{': offline' if hub_offline() else ''})"


# Under the guidance controls when a Flux model is chosen: what its two scales do (pipelines/families.py FluxFamily).
FLUX_GUIDANCE_NOTE = (
    "ℹ️ **Flux: two kinds of guidance.** FLUX.1-dev was *distilled* to imitate CFG: the guidance scale is an input "
    "to the model, so one pass per step follows the prompt more or less closely (FLUX.1-schnell has no such input and "
    "ignores it). **True CFG** is the classic kind: a second pass on the negative prompt (empty = \"\"), mixed as "
    "neg + s·(cond − neg) by the guidance method above; on above 1, twice the work per step. The dissection then "
    "shows the x̂0 of both passes.")


def model_family(model: str, loader) -> str | None:
    """The family key of a registry model (its entry) or a loaded one (its pipeline); None while unknown."""
    if model in MODELS:
        return MODELS[model].family
    pipe = loader.loaded(model)
    return None if pipe is None else family_of(pipe).key


def method_note(key: str) -> str:
    spec = METHODS[key]
    params = "" if spec.params else " No parameters."
    return f"**{spec.key}** — {spec.summary}. _{spec.paper}_.{params}"


class Controls:
    """Every widget that goes into a GenerationRequest, plus Generate / Stop."""

    def __init__(self, app: Playground) -> None:
        self.app = app
        model0 = app.default_model
        rec = known_settings(model0, app.loader)
        with gr.Column(elem_id="prompt-block"):
            # The hint is in the placeholder: an `info` line would join the label's accessible name ("Prompt").
            self.prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a small yellow star in the top left   "
                                     "(Ctrl/Cmd+Enter or Shift+Enter: Generate; Enter: new line)")
            self.prompt_note = gr.Markdown("", elem_classes="step-note", elem_id="prompt-note")
            self.negative_prompt = gr.Textbox("", label="Negative prompt", lines=1,
                                              placeholder="(none; Ctrl/Cmd+Enter generates)")
            with gr.Row():
                self.generate_btn = gr.Button("Generate", variant="primary", scale=3, elem_id="generate-btn")
                self.stop_btn = gr.Button("Stop", variant="stop", scale=1)
        with gr.Column(elem_id="settings-block") as self.settings_block:  # ui/pnginfo.py adds PNG info at its end
            # Below the buttons on a desktop; after the result on a phone (ui/theme.py orders the blocks).
            gr.Examples(EXAMPLE_PROMPTS, inputs=[self.prompt], label="Prompts in the embedded model's world",
                        cache_examples=False, examples_per_page=len(EXAMPLE_PROMPTS))
            self.model = gr.Dropdown([(model_label(m), m) for m in app.models], value=model0, label="Model")
            self.model_note = gr.Markdown(self.note_for(model0), elem_classes="step-note", elem_id="model-note")
            self.scheduler = gr.Dropdown(app.scheduler_choices(model0), value=rec.scheduler or OWN_SCHEDULER,
                                         label="Scheduler",
                                         info="stochastic samplers add fresh noise every step; heun and pndm "
                                              "evaluate the model more often than the step count; only the "
                                              "samplers this model can run are listed (lcm: LCM-distilled "
                                              "models only)")
            self.num_inference_steps = StrictSlider(1, MAX_STEPS, value=rec.num_inference_steps, step=1, label="Steps")
            with gr.Row():
                self.guidance = gr.Dropdown([(k, k) for k in METHODS], value=rec.guidance, label="Guidance method",
                                            scale=1)
                lo, hi = guidance_range(rec.guidance_scale)
                self.guidance_scale = StrictSlider(lo, hi, value=rec.guidance_scale, step=0.1,
                                                label="Guidance scale", scale=2)
            flux = model_family(model0, app.loader) == "flux"
            self.true_cfg_scale = StrictSlider(0, 10, value=1, step=0.1, label="True CFG scale", visible=flux,
                                               elem_id="true-cfg-scale",
                                               info="Flux: a second pass on the negative prompt; 1 = off")
            self.flux_note = gr.Markdown(FLUX_GUIDANCE_NOTE, visible=flux, elem_classes="step-note",
                                         elem_id="flux-guidance-note")
            with gr.Accordion("Guidance method parameters", open=False):
                self.method_note = gr.Markdown(method_note(rec.guidance), elem_classes="step-note")
                self.param_groups: dict[str, gr.Group] = {}
                self.param_sliders: dict[str, StrictSlider] = {}  # "method__param" -> slider
                for key, spec in METHODS.items():
                    with gr.Group(visible=key == rec.guidance) as group:
                        for p in spec.params:
                            step = 1 if p.integer else 0.01  # fine enough for every default (e.g. σ 0.28)
                            value = rec.guidance_params.get(p.name, p.default) if key == rec.guidance else p.default
                            self.param_sliders[f"{key}__{p.name}"] = StrictSlider(
                                p.low, p.high, value=value, step=step, label=p.name, info=p.doc)
                    self.param_groups[key] = group
            with gr.Row(equal_height=True):  # ♻ as tall as the seed box beside it
                self.seed = gr.Number(value=0, precision=0, label="Seed", scale=2, min_width=120)
                # ♻ (A1111's habit): the last run's seed back in the box, Random seed unticked (ui/pnginfo.py wires it)
                self.reuse_seed_btn = gr.Button("♻", size="lg", scale=0, min_width=48, elem_id="reuse-seed")
                self.randomize_seed = gr.Checkbox(value=True, label="Random seed", scale=1, min_width=110)
            self.num_images_per_prompt = StrictSlider(
                1, batch_limit(app, model0, rec.num_inference_steps), value=1, step=1, label="Batch size",
                elem_id="batch-size", info="images per click, in one batched run; image i uses seed + i, so each can "
                                           "be made again alone")
            with gr.Row():
                self.width = StrictSlider(0, MAX_SIDE, value=0, step=8, label="Width", info="0 = the model's size")
                self.height = StrictSlider(0, MAX_SIDE, value=0, step=8, label="Height", info="0 = the model's size")
            self.size_note = gr.Markdown("", elem_classes="step-note", elem_id="size-note")
            self.x0_preview = gr.Radio(X0_CHOICES, value="auto", label="x̂0 preview",
                                       info="Auto: the scrubber decodes small images with the VAE; the live view uses "
                                            "the model's fast colour preview on a CPU. Each panel's caption names "
                                            "the preview it shows.")

    # -- request ---------------------------------------------------------------------------------------

    @property
    def inputs(self) -> dict[str, gr.components.Component]:
        """Handler keyword -> widget, for inputs_kwargs."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, model=self.model, scheduler=self.scheduler,
                    num_inference_steps=self.num_inference_steps, guidance=self.guidance,
                    guidance_scale=self.guidance_scale, seed=self.seed, randomize_seed=self.randomize_seed,
                    width=self.width, height=self.height, x0_preview=self.x0_preview,
                    num_images_per_prompt=self.num_images_per_prompt, true_cfg_scale=self.true_cfg_scale,
                    **self.param_sliders)

    def request(self, values: dict[str, Any]) -> tuple[GenerationRequest, str]:
        """Widget values (as `inputs` names them) -> (validated request, x̂0 preview choice); ValueError if refused."""
        self.app.check_offered(values["model"])
        method = values.get("guidance") or "cfg"
        request = build_request(
            prompt=values["prompt"], negative_prompt=values["negative_prompt"], model=values["model"],
            loader=self.app.loader, scheduler=values["scheduler"], num_inference_steps=values["num_inference_steps"],
            guidance_scale=values["guidance_scale"],
            seed=None if values["randomize_seed"] or values["seed"] is None else values["seed"],
            width=values["width"], height=values["height"], guidance=method,
            guidance_params=self.changed_params(method, values), limits=self.app.limits,
            num_images_per_prompt=values.get("num_images_per_prompt"),
            true_cfg_scale=values.get("true_cfg_scale") if self.flux(values["model"]) else None,
        )
        return request, values.get("x0_preview") or "auto"

    @staticmethod
    def changed_params(method: str, values: dict[str, Any]) -> dict[str, float]:
        """The method's sliders that the user moved off their default. A slider left at its default sends nothing,
        so the method takes the default for the model's prediction type (CFG-Zero*'s zero-init is 1 on flow
        models, 0 on ε/v models: guidance/registry.py)."""
        defaults = {p.name: p.default for p in METHODS[method].params} if method in METHODS else {}
        prefix = f"{method}__"
        return {k.removeprefix(prefix): v for k, v in values.items()
                if k.startswith(prefix) and v != defaults.get(k.removeprefix(prefix))}

    def flux(self, model: str) -> bool:
        """Whether `model` is a Flux model (the true CFG slider is shown and sent only then)."""
        return model_family(model, self.app.loader) == "flux"

    # -- notes -----------------------------------------------------------------------------------------

    def size_note_for(self, model: str, width: float | None, height: float | None) -> str:
        """The line under Width / Height: what a size other than the model's own gives (pipelines.profile.size_note);
        "" at its own size or while its size is not known (a folder outside the registry, not loaded yet)."""
        pipe = self.app.loader.loaded(model)
        if pipe is None and model not in MODELS:
            return ""
        native = native_size(model, pipe)
        note = size_note(native, int(width or native), int(height or native))
        return f"ℹ️ {note[0].upper()}{note[1:]}." if note else ""

    def note_for(self, model: str) -> str:
        """The line under the model dropdown: where it comes from, its note, and what is wrong when it cannot run."""
        missing = self.app.missing_embedded(model)
        if missing:
            return f"⚠️ {missing}"
        entry = MODELS.get(model)
        text = f"`{display_source(model)}`" + (f" — {entry.note}" if entry else "")
        if model != DEFAULT_MODEL and self.app.loader.loaded(model) is None and not is_available_offline(model):
            text = f"⚠️ {offline_hint(model)}  \n{text}"
        return text

    def prompt_notes(self, prompt: str, negative_prompt: str, model: str, num_inference_steps: Any = None) -> str:
        try:  # the prompt cap before anything reads the text (a 10-million-character prompt took 8 s and 1.3 GB)
            var = ENV_VARS["max_prompt_chars"]
            prompt = text_field("prompt", prompt, self.app.limits.max_prompt_chars, var)
            negative_prompt = text_field("negative_prompt", negative_prompt, self.app.limits.max_prompt_chars, var)
            if model not in self.app.models:
                return ""
        except ValueError as e:
            return f"⚠️ {e}"
        pipe = self.app.loader.loaded(model)
        if pipe is None and model == DEFAULT_MODEL and self.app.missing_embedded(model) is None:
            pipe = self.app.loader.get(model)  # the embedded model loads in under a second: worth it for the notes
        try:
            steps = whole_number("num_inference_steps", num_inference_steps) if num_inference_steps else None
            notes = notes_on_prompt(pipe, prompt or "", negative_prompt or "", vocabulary=model_vocabulary(model),
                                    steps=steps if steps and 1 <= steps <= MAX_STEPS else None)  # the schedule's steps
        except ValueError as e:
            notes = [str(e)]
        return "  \n".join(f"ℹ️ {n}" for n in notes)

    # -- wiring ----------------------------------------------------------------------------------------

    def on_model(self, model_value: str) -> dict:
        try:
            self.app.check_offered(model_value)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        rec = known_settings(model_value, self.app.loader)
        lo, hi = guidance_range(rec.guidance_scale)
        out: dict = {self.scheduler: gr.Dropdown(choices=self.app.scheduler_choices(model_value),
                                                 value=rec.scheduler or OWN_SCHEDULER),
                     self.model_note: self.note_for(model_value), self.width: 0, self.height: 0, self.size_note: "",
                     self.guidance_scale: gr.Slider(lo, hi)}
        flux = self.flux(model_value)
        out |= {self.true_cfg_scale: gr.Slider(visible=flux, value=1), self.flux_note: gr.Markdown(visible=flux)}
        if rec is not UNKNOWN:  # an unknown folder keeps the user's values; unset ones are filled when it runs
            out |= {self.num_inference_steps: rec.num_inference_steps,
                    self.guidance_scale: gr.Slider(lo, hi, value=rec.guidance_scale), self.guidance: rec.guidance}
            out |= {self.param_sliders[f"{rec.guidance}__{k}"]: v for k, v in rec.guidance_params.items()}
            out |= self.on_method(rec.guidance)
        most = batch_limit(self.app, model_value, rec.num_inference_steps)
        # A slider needs minimum < maximum: where the budget fits one image only, it shows 1 and cannot be moved
        out[self.num_images_per_prompt] = gr.Slider(1, max(most, 2), value=1, interactive=most > 1)
        return out

    def on_method(self, method: str) -> dict:
        if method not in METHODS:
            raise gr.Error(f"unknown guidance method {str(method)[:60]!r}; choose one of: {', '.join(METHODS)}",
                           print_exception=False)
        return {self.method_note: method_note(method)} | {g: gr.Group(visible=k == method)
                                                          for k, g in self.param_groups.items()}

    def wire(self) -> None:
        self.model.input(self.on_model, inputs_kwargs=dict(model_value=self.model),
                         outputs=[self.scheduler, self.model_note, self.width, self.height, self.size_note,
                                  self.num_inference_steps,
                                  self.num_images_per_prompt, self.true_cfg_scale, self.flux_note,
                                  self.guidance_scale, self.guidance, self.method_note, *self.param_groups.values(),
                                  *self.param_sliders.values()], api_visibility="private")
        for side in (self.width, self.height):  # release: the box left or the handle let go, in range (ui/sliders.py)
            side.release(self.size_note_for, inputs_kwargs=dict(model=self.model, width=self.width, height=self.height),
                         outputs=[self.size_note], show_progress="hidden", trigger_mode="always_last",
                         api_visibility="private", queue=False)
        self.guidance.change(self.on_method, inputs_kwargs=dict(method=self.guidance),
                             outputs=[self.method_note, *self.param_groups.values()], api_visibility="private")
        notes = dict(fn=self.prompt_notes, inputs_kwargs=dict(prompt=self.prompt, negative_prompt=self.negative_prompt,
                                                               model=self.model,
                                                               num_inference_steps=self.num_inference_steps),
                     outputs=[self.prompt_note], show_progress="hidden", trigger_mode="always_last",
                     api_visibility="private", concurrency_id="notes", concurrency_limit=2)  # queued, bounded
        for widget in (self.prompt, self.negative_prompt, self.model, self.num_inference_steps):  # steps: a schedule's
            widget.change(**notes)

    def restore(self, req: dict[str, Any], seed: int | None) -> dict:
        """Widget values that bring back a past run's settings (req: its trace's request dict)."""
        model = req.get("model")
        out: dict = {
            self.prompt: req.get("prompt", ""), self.negative_prompt: req.get("negative_prompt", ""),
            self.num_inference_steps: req.get("num_inference_steps", 20), self.guidance_scale: req.get("guidance_scale", 7.5),
            self.guidance: req.get("guidance", "cfg"), self.seed: seed, self.randomize_seed: False,
            self.width: req.get("width") or 0, self.height: req.get("height") or 0,
            self.num_images_per_prompt: req.get("num_images_per_prompt") or 1,
            self.true_cfg_scale: req.get("true_cfg_scale") or 1,
        }
        if model in self.app.models:
            out[self.model] = model
            out[self.model_note] = self.note_for(model)
            out[self.size_note] = self.size_note_for(model, req.get("width"), req.get("height"))
            flux = self.flux(model)
            out[self.true_cfg_scale] = gr.Slider(visible=flux, value=req.get("true_cfg_scale") or 1)
            out[self.flux_note] = gr.Markdown(visible=flux)
            out[self.scheduler] = gr.Dropdown(choices=self.app.scheduler_choices(model),
                                              value=req.get("scheduler") or OWN_SCHEDULER)
        else:
            gr.Warning(f"model {model!r} of that run is not offered here; model left unchanged")
        for name, value in (req.get("guidance_params") or {}).items():
            slider = self.param_sliders.get(f"{req.get('guidance', 'cfg')}__{name}")
            if slider is not None:
                out[slider] = value
        return out | self.on_method(req.get("guidance", "cfg"))

    @property
    def restore_outputs(self) -> list:
        return [self.prompt, self.negative_prompt, self.model, self.model_note, self.scheduler, self.num_inference_steps,
                self.guidance_scale, self.guidance, self.seed, self.randomize_seed, self.width, self.height, self.size_note,
                self.num_images_per_prompt, self.true_cfg_scale, self.flux_note,
                self.method_note, *self.param_sliders.values(), *self.param_groups.values()]


def offline_hint(model: str) -> str:
    """One actionable line for a hub model that is not on this machine."""
    source = resolve(model)
    if hub_offline():
        return (f"`{source}` is not in the local Hugging Face cache and this machine is offline (HF_HUB_OFFLINE=1): "
                f"run `hf download {source}` where there is network, or unset HF_HUB_OFFLINE.")
    # Never a promise: without network (HF_HUB_OFFLINE unset, no route to the Hub) the fetch fails, and says so.
    return (f"`{source}` is not downloaded on this server: a run asks the Hugging Face Hub for it (several GB; "
            f"minutes where the server has network, an error where it has none).")
