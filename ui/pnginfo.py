"""Restoring settings from elsewhere: PNG info (a PNG dropped or picked, ours or AUTOMATIC1111's, or an A1111
parameters text pasted: its settings fill the controls), its HTTP endpoint /png_info, and ♻, which puts the last
run's seed back in the seed box.

The PNG is the one upload the page takes (app.py sets `_Blocks.uploads` to UPLOADS: at most 1 MB, PNG signature
checked by ui/uploads.py's gate before Gradio writes a byte). Gradio's upload route still writes it to its upload
folder; the handler takes it without Gradio's preprocessing (which would copy it into the cache), reads it into
memory, deletes it at once and parses the bytes (pipelines/pnginfo.py). Uploads nobody asked to read are deleted by
the next PNG-info call once STALE_UPLOAD_SECONDS old (and by Gradio when the server stops).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import gradio as gr

from guidance.registry import METHODS
from pipelines.outputs import Trace
from pipelines.pnginfo import EXAMPLE, MAX_PNG_BYTES, PNG_SIGNATURE, parse_parameters, read_png_info
from pipelines.requests import OWN_SCHEDULER
from pipelines.schedulers import SCHEDULERS
from ui.controls import Controls, guidance_range, known_settings
from ui.state import Playground
from ui.uploads import UploadLimits

# What Gradio's upload route takes here: PNGs of at most 1 MB (plus the multipart envelope), 30 files and 30 MB per
# client address an hour.
UPLOADS = UploadLimits(request_bytes=MAX_PNG_BYTES + 16 * 2**10, per_client=30, bytes_per_client=30 * 2**20,
                       file_signature=PNG_SIGNATURE, file_bytes=MAX_PNG_BYTES, file_kind="PNG images (PNG info)")
STALE_UPLOAD_SECONDS = 300.0  # an upload no PNG-info call has read by then is deleted by the next call
SOURCES = {"request": "the PNG's request chunk", "parameters": "the PNG's parameters text"}


class PngInfoView:
    """The PNG-info drop, the parameters box, the hidden widgets of /png_info, and the ♻ seed button's wiring."""

    def __init__(self, app: Playground, controls: Controls, run_id: gr.State) -> None:
        self.app = app
        self.controls = controls
        self.run_id = run_id  # the live view's run id: whose seed ♻ brings back
        with gr.Column(elem_id="pnginfo-block"):
            with gr.Accordion("PNG info: settings from an image or a parameters text", open=False, elem_id="pnginfo"):
                self.file = gr.File(label="Drop or pick a PNG (this playground's or AUTOMATIC1111's; at most 1 MB, "
                                          "read and discarded, never kept)", file_types=[".png"], height=120,
                                    elem_id="pnginfo-file")
                self.text = gr.Textbox(label="…or paste an AUTOMATIC1111 parameters text", lines=3,
                                       placeholder=EXAMPLE, elem_id="pnginfo-text")
                self.apply_btn = gr.Button("Apply parameters text", size="sm", elem_id="pnginfo-apply")
                self.status = gr.Markdown("", elem_classes="step-note", elem_id="pnginfo-status")
        with gr.Group(visible=False):  # /png_info's parameters and result
            self.api_png = gr.File(label="png", file_types=[".png"])
            self.api_text = gr.Textbox("", label="text")
            self.api_info = gr.JSON(label="settings")
            self.api_btn = gr.Button()

    # -- reading -------------------------------------------------------------------------------------------------

    def settings(self, png: dict | None, text: str | None, uploaded: set[str]) -> dict[str, Any]:
        """The settings of an uploaded PNG (Gradio's FileData, unprocessed) or of a parameters text; ValueError when
        neither or both are given or the input is refused."""
        sweep_uploads(uploaded)
        if png and (text or "").strip():
            take_upload(png, uploaded)  # refused, and still never kept
            raise ValueError("give either a PNG or a parameters text, not both")
        if png:
            return read_png_info(take_upload(png, uploaded))
        if text and text.strip():
            return parse_parameters(text)
        raise ValueError("give a PNG (saved by this playground or AUTOMATIC1111) or a parameters text")

    # -- restoring -----------------------------------------------------------------------------------------------

    def offered_model(self, model: Any) -> str | None:
        """The offered model a PNG names: the same key, or the same last path part (A1111 and our parameters text
        name a local folder by its name, a checkpoint by its file's stem)."""
        if not isinstance(model, str) or not model:
            return None
        if model in self.app.models:
            return model
        name = model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
        for offered in self.app.models:
            if offered.rstrip("/").rsplit("/", 1)[-1].lower() == name:
                return offered
        return None

    def scheduler_for(self, key: str | None, model: str) -> tuple[str, str | None]:
        """The dropdown value for scheduler `key` on `model`: the key when it fits, else the fitting one with the
        same A1111 label (Euler on a flow model is flow_euler), else the model's own with a note."""
        if key is None:
            return OWN_SCHEDULER, None
        keys = [k for _, k in self.app.scheduler_choices(model)]
        if key in keys:
            return key, None
        label = SCHEDULERS[key].label if key in SCHEDULERS else None
        same = [k for k in keys if k in SCHEDULERS and SCHEDULERS[k].label == label]
        if same:
            return same[0], None
        return OWN_SCHEDULER, f"scheduler {key} does not fit {model}; its own scheduler is selected"

    def restore(self, info: dict[str, Any], current_model: str) -> tuple[dict, list[str]]:
        """Widget updates that bring `info`'s settings into the controls (Controls.restore; a setting `info` does
        not name keeps its widget's value), and notes on what could not be brought."""
        controls = self.controls
        notes = list(info.get("notes") or [])
        model = self.offered_model(info.get("model"))
        if model is None:
            if info.get("model"):
                notes.append(f"model {str(info['model'])[:80]!r} is not offered here; kept {current_model}")
            model = current_model if current_model in self.app.models else self.app.default_model
        scheduler, note = self.scheduler_for(info.get("scheduler"), model)
        if note:
            notes.append(note)
        method = info.get("guidance") or "cfg"
        # The method's sliders go back to their defaults first: a slider the image does not set sends nothing.
        defaults = {controls.param_sliders[f"{method}__{p.name}"]: p.default
                    for p in (METHODS[method].params if method in METHODS else ())}
        out = defaults | controls.restore(info | {"model": model, "scheduler": scheduler}, info.get("seed"))
        lo, hi = guidance_range(known_settings(model, self.app.loader).guidance_scale)
        if "guidance_scale" in info:  # the slider's range follows the model, and reaches the image's scale
            out[controls.guidance_scale] = gr.Slider(lo, max(hi, info["guidance_scale"]), value=info["guidance_scale"])
        batch = getattr(controls, "num_images_per_prompt", None)
        if batch is not None:
            out[batch] = info.get("num_images_per_prompt", 1)
        kept = {"num_inference_steps": [controls.num_inference_steps], "guidance_scale": [controls.guidance_scale],
                "seed": [controls.seed, controls.randomize_seed], "width": [controls.width],
                "height": [controls.height]}
        for key, widgets in kept.items():
            if key not in info:
                for widget in widgets:
                    out.pop(widget, None)
        return out, notes

    def restored(self, info: dict[str, Any], current_model: str, what: str) -> dict:
        out, notes = self.restore(info, current_model)
        seed = f", seed {info['seed']}" if "seed" in info else ""
        lines = [f"Settings restored from {what}{seed}. Press **Generate** (or Ctrl/Cmd+Enter in the prompt) to "
                 "make it again."] + [f"ℹ️ {n}" for n in notes]
        return out | {self.status: "  \n".join(lines)}

    def refused(self, error: ValueError) -> dict:
        gr.Warning(f"PNG info: {error}")
        return {self.status: f"⚠️ **Not restored:** {error}"}

    @property
    def outputs(self) -> list:
        restore = self.controls.restore_outputs
        batch = getattr(self.controls, "num_images_per_prompt", None)
        extra = [batch] if batch is not None and batch not in restore else []
        return [*restore, *extra, self.status, self.file]

    # -- ♻ ---------------------------------------------------------------------------------------------------------

    def last_seed(self, run_id: str) -> int | None:
        """The seed of run `run_id` (the live view's: the last run of this tab, or the one restored from the
        history), from memory or its trace.json; None when there is none."""
        run = self.app.runs.get(run_id) if run_id else None
        if run is not None:
            return run.result.seed if run.result is not None else run.request.seed
        if not run_id or Path(run_id).name != run_id:
            return None
        try:
            return Trace.read(self.app.outputs_dir / run_id).seed
        except (OSError, ValueError):
            return None

    def reuse_seed(self, run_id: str) -> dict:
        seed = self.last_seed(run_id)
        if seed is None:
            gr.Warning("No finished run in this tab yet: generate one, then ♻ puts its seed back.")
            return {self.controls.seed: gr.skip(), self.controls.randomize_seed: gr.skip()}
        return {self.controls.seed: seed, self.controls.randomize_seed: False}

    # -- wiring --------------------------------------------------------------------------------------------------

    def wire(self, demo: gr.Blocks) -> None:
        uploaded = demo.upload_file_set  # paths Gradio's upload route wrote: the only files a handler deletes
        model = self.controls.model

        def on_file(png: dict | None, current_model: str) -> dict:
            if not png:  # the file was cleared
                return {}
            try:
                info = self.settings(png, None, uploaded)
            except ValueError as e:
                return self.refused(e) | {self.file: None}
            return self.restored(info, current_model, SOURCES[info["source"]]) | {self.file: None}

        def on_text(text: str, current_model: str) -> dict:
            try:
                info = self.settings(None, text, uploaded)
            except ValueError as e:
                return self.refused(e)
            return self.restored(info, current_model, "the parameters text")

        def png_info(png: dict | None = None, text: str | None = "") -> dict:
            """The settings of a PNG (ours or AUTOMATIC1111's, at most 1 MB) or of an A1111 parameters text, named and
            written as /generate's parameters, with `source` ("request" or "parameters") and `notes` (what was not
            used).

            Args:
                png: a PNG saved by this playground (its request) or by AUTOMATIC1111 (its parameters text), at most 1 MB; over MCP a public http(s) URL of one (Gradio fetches no private or loopback address). Give it or text, not both.
                text: an AUTOMATIC1111 parameters text: the prompt, then "Negative prompt: ..." and a line such as "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64". Give it or png, not both.
            """
            try:
                return as_generate_parameters(self.settings(png, text, uploaded))
            except ValueError as e:
                raise gr.Error(str(e), print_exception=False) from None

        # preprocess=False: the handler gets the upload's FileData (its path), not Gradio's copy of the file.
        self.file.upload(on_file, inputs=[self.file, model], outputs=self.outputs, preprocess=False,
                         api_visibility="private")
        self.apply_btn.click(on_text, inputs=[self.text, model], outputs=self.outputs, api_visibility="private")
        self.api_btn.click(png_info, inputs_kwargs=dict(png=self.api_png, text=self.api_text), outputs=[self.api_info],
                           preprocess=False, api_name="png_info")
        self.controls.reuse_seed_btn.click(self.reuse_seed, inputs=[self.run_id],
                                           outputs=[self.controls.seed, self.controls.randomize_seed],
                                           api_visibility="private")  # queued: a warning needs the queue


def as_generate_parameters(info: dict[str, Any]) -> dict[str, Any]:
    """Settings written as /generate takes them (ui/api.py parameters): the model's own scheduler "", its own size 0,
    guidance_params as JSON text; so `client.predict(**settings_without_source_and_notes, api_name="/generate")`
    makes the image again."""
    unset = {"scheduler": "", "width": 0, "height": 0}
    out = {k: unset[k] if v is None and k in unset else v for k, v in info.items()}
    if "guidance_params" in out:
        out["guidance_params"] = json.dumps(out["guidance_params"], sort_keys=True)
    return out


def take_upload(png: Any, uploaded: set[str]) -> bytes:
    """The bytes of a file Gradio's upload route wrote (`png`: its FileData as a dict), read into memory; the file
    is deleted whatever its content. Refused when the path is not one the route wrote or the file is over 1 MB."""
    given = png.get("path") if isinstance(png, dict) else None
    path = next((p for p in list(uploaded) if isinstance(given, str) and os.path.abspath(p) == os.path.abspath(given)),
                None)
    if path is None:
        raise ValueError("that file was not uploaded to this page, or was read already; drop or pick it again")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PNG_BYTES + 1)
    except OSError:
        raise ValueError("that upload is gone; drop or pick the file again") from None
    finally:
        _delete_upload(path, uploaded)
    if len(data) > MAX_PNG_BYTES:
        raise ValueError(f"the file is over {MAX_PNG_BYTES} bytes; PNG info reads PNGs of at most 1 MB")
    return data


def sweep_uploads(uploaded: set[str], older_than: float = STALE_UPLOAD_SECONDS) -> None:
    """Delete the uploads no handler has read within `older_than` seconds (an upload sent without its event)."""
    now = time.time()
    for path in list(uploaded):
        try:
            stale = now - os.stat(path).st_mtime > older_than
        except OSError:
            stale = True
        if stale:
            _delete_upload(path, uploaded)


def _delete_upload(path: str, uploaded: set[str]) -> None:
    """Remove an uploaded file and the folder Gradio made for it (named by its hash) when that is left empty."""
    uploaded.discard(path)
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass
