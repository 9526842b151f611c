"""The history view: past runs read from disk (one Trace reader), newest first; clicking one restores its settings,
its image and code, and its scrubber (from memory, or from the step tensors saved in its folder)."""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.errors import client_message
from pipelines.outputs import Trace
from pipelines.types import GenerationRequest
from ui.render import diffusers_script
from ui.state import Playground

log = logging.getLogger("playground")

HISTORY_LIMIT = 60  # runs shown in the history gallery


def request_dict(trace: Trace) -> dict[str, Any]:
    req = trace.request
    return req.to_dict() if isinstance(req, GenerationRequest) else dict(req)


def caption(trace: Trace) -> str:
    """Prompt start, then what a user compares runs by: scheduler, steps, guidance, seed."""
    req = request_dict(trace)
    prompt = req.get("prompt") or "(no prompt)"
    prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
    method = req.get("guidance") or "cfg"
    guidance = f"CFG {req.get('guidance_scale', 0):g}" if method == "cfg" else f"{method} {req.get('guidance_scale', 0):g}"
    stopped = " · stopped" if trace.cancelled else ""
    return f"{prompt} · {trace.scheduler} · {req.get('num_inference_steps')} steps · {guidance} · seed {trace.seed}{stopped}"


def history(outputs_dir: Path, limit: int = HISTORY_LIMIT) -> list[tuple[str, str]]:
    """Past runs on disk, newest first, as (run folder, caption). Anything that is not a finished run read by Trace.read
    (a foreign, malformed, symlinked or half-written folder) is skipped and logged, never fatal."""
    runs = []
    try:
        entries = list(os.scandir(outputs_dir))
    except OSError as e:
        log.warning("history: cannot list %s: %s", outputs_dir, e)
        return []
    for entry in entries:
        if entry.name.startswith("."):  # temporary files and runs being removed
            continue
        try:
            if entry.is_symlink():
                log.info("history skips %s: a symbolic link; a run folder is a real folder", entry.name)
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            runs.append((os.lstat(os.path.join(entry.path, "trace.json")).st_mtime, Path(entry.path)))
        except OSError:  # no trace.json: unfinished (or not a run); history shows finished runs only
            continue
    items = []
    for _, folder in sorted(runs, reverse=True):
        if len(items) >= limit:
            break
        try:
            trace = Trace.read(folder)
            items.append((str(folder), caption(trace)))
        except Exception as e:  # one bad folder must never break the page: skip it, say why in the log
            log.info("history skips %s: %s", folder.name, e)
    return items


RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8,32}$")  # what Playground.start names a run folder
MAX_OWN_RUNS = 200  # run ids a browser remembers


def own_history(outputs_dir: Path, run_ids: list[str], limit: int = HISTORY_LIMIT) -> list[tuple[str, str]]:
    """The runs among `run_ids` (a browser's own, oldest first) still on disk and readable, newest first."""
    items = []
    for rid in reversed(run_ids if isinstance(run_ids, list) else []):
        if len(items) >= limit:
            break
        if not isinstance(rid, str) or not RUN_ID.match(rid):
            continue  # the list comes from the browser: only a run folder's own name is looked up
        folder = outputs_dir / rid
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            items.append((str(folder), caption(Trace.read(folder))))
        except Exception as e:  # removed by retention, half-written, malformed: skip it, never break the page
            log.info("history skips %s: %s", rid, e)
    return items


def browser_secret(outputs_dir: Path) -> str:
    """The key the browser's list of own runs is encrypted with: PLAYGROUND_SECRET, else one kept beside the
    outputs (created once), so the list survives a restart."""
    if os.environ.get("PLAYGROUND_SECRET"):
        return os.environ["PLAYGROUND_SECRET"]
    path = outputs_dir / ".browser-secret"
    try:
        return path.read_text().strip() or _new_secret(path)
    except OSError:
        return _new_secret(path)


def _new_secret(path: Path) -> str:
    value = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
    except OSError as e:  # read-only outputs: the list then lasts until the server restarts
        log.warning("cannot keep the browser secret in %s: %s", path.parent, e)
    return value


class HistoryView:
    """A gallery of past runs; its folders are kept in a State so a click maps back to a run.

    Private by default: each browser sees only the runs it made (their ids live in its own encrypted
    BrowserState, and run ids are 96 random bits that no other client is sent); `shared` shows everyone's newest
    runs (PLAYGROUND_SHARED_HISTORY=1, for a private machine)."""

    def __init__(self, app: Playground, shared: bool = False) -> None:
        self.app = app
        self.shared = shared
        self.mine = gr.BrowserState([], storage_key="diffusion-playground-runs",
                                    secret=browser_secret(app.outputs_dir))
        self.folders = gr.State([])
        self.gallery = gr.Gallery(label="Past runs", columns=8, height=260,
                                  fit_columns=False, object_fit="contain", allow_preview=False, elem_id="history",
                                  elem_classes="pixelated", show_label=True)

    def outputs(self, mine: list[str] | None = None, add: str | None = None) -> dict:
        """Gallery and folders (and this browser's run ids, with `add` appended when given)."""
        mine = [r for r in (mine if isinstance(mine, list) else []) if isinstance(r, str)]
        if add and add not in mine:
            mine = [*mine, add][-MAX_OWN_RUNS:]
        outputs_dir = self.app.outputs_dir
        items = history(outputs_dir) if self.shared else own_history(outputs_dir, mine)
        # The label says how many runs there are, so "none yet" is visibly loaded, not still on its way.
        label = (f"Past runs ({len(items)}; click one to restore its settings)" if items else
                 f"Past runs: none yet{'' if self.shared else ' from this browser'}")
        return {self.gallery: gr.Gallery([(str(Path(f) / "image.png"), c) for f, c in items], label=label),
                self.folders: [f for f, _ in items], self.mine: mine}

    def on_select(self, controls, live, folders: list[str], evt: gr.SelectData) -> dict:
        """Restore a past run's settings, image, code and (where its steps were kept) its scrubber."""
        if evt.index is None or evt.index >= len(folders):
            return {}
        folder = Path(folders[evt.index])
        try:
            trace = Trace.read(folder)
        except (OSError, ValueError) as e:
            return live.cleared(f"⚠️ **Error:** cannot restore run `{folder.name}`: "
                                f"{client_message(e, self.app.outputs_dir)}")
        req = request_dict(trace)
        out = controls.restore(req, trace.seed)
        out |= {live.final_image: str(folder / "image.png"), live.run_id: folder.name,
                live.status: f"Restored the settings of run `{folder.name}` (seed {trace.seed}); press Generate to rerun."}
        try:
            request = GenerationRequest(**(req | {"guidance_params": req.get("guidance_params") or {}}))
            out[live.code] = diffusers_script(
                request, seed=trace.seed, width=trace.width, height=trace.height, scheduler=trace.scheduler,
                family=trace.family, stopped_at=len(trace.steps) if trace.cancelled else None,
                dtype=self.app.loader.dtype, device=self.app.loader.device.type)
        except (KeyError, TypeError, ValueError):
            out[live.code] = ""
        run = self.app.runs.get(folder.name) or self.app.restore(folder, trace)
        out |= live.scrubber(run) if run is not None else {live.scrub_group: gr.Group(visible=False)}
        return out

    def wire(self, demo: gr.Blocks, controls, live) -> None:
        def select(folders: list[str], evt: gr.SelectData):
            return self.on_select(controls, live, folders, evt)

        self.gallery.select(select, inputs=[self.folders],
                            outputs=[*controls.restore_outputs, *live.outputs], api_visibility="private")
        demo.load(self.outputs, inputs=[self.mine], outputs=[self.gallery, self.folders, self.mine],
                  api_visibility="private")
