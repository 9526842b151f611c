"""The history view: past runs read from disk (one Trace reader), newest first; clicking one restores its settings,
its image and code, and its scrubber (from memory, or from the step tensors saved in its folder)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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
from pipelines.words import counted
from ui.live import batch_gallery, final_caption
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
    n = len(trace.images)
    seed = f"seed {trace.seed}" if n == 1 else f"{n} images · seeds {trace.seed}–{trace.seed + n - 1}"
    steps = counted(req.get("num_inference_steps"), "step")
    return f"{prompt} · {trace.scheduler} · {steps} · {guidance} · {seed}{stopped}"


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


LEGACY_KEY_FILE = ".browser-secret"  # where the key used to be kept: inside the served outputs folder
STORAGE_KEY = "diffusion-playground-history"  # the browser's localStorage entry (the old one held a list)
# gr.BrowserState encrypts in the browser (CryptoJS AES) with its `secret`, which it therefore sends to every visitor
# in /config: that wrapping hides nothing from anyone who can read the page. This fixed, public value only keeps the
# entry readable across restarts; the list inside is a token the server signs (sign_runs) with a key it never sends.
STORAGE_WRAP = "public: integrity comes from the server's signature"
TOKEN_CHARS = 16_384  # a signed list of MAX_OWN_RUNS ids is at most ~14 KB; anything longer is not one of ours


def key_file() -> Path | None:
    """Where the history key is kept when PLAYGROUND_SECRET is unset: a private folder outside every folder Gradio
    serves ($XDG_CACHE_HOME or ~/.cache, then diffusion-playground/history-key); None when PLAYGROUND_SECRET is set."""
    if os.environ.get("PLAYGROUND_SECRET"):
        return None
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "diffusion-playground" / "history-key"


def history_key() -> bytes:
    """The key the server signs each browser's list of own runs with: PLAYGROUND_SECRET, else key_file()'s (created
    once, mode 0600), so a browser's history survives a restart. It never leaves the server."""
    path = key_file()
    secret = os.environ["PLAYGROUND_SECRET"] if path is None else _read_or_create(path)
    # A key of its own for this one use, whatever else the secret may protect.
    return hmac.new(secret.encode(), b"diffusion-playground history v1", hashlib.sha256).digest()


def _read_or_create(path: Path) -> str:
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot read the history key %s (%s): histories last until the server restarts", path, e)
        return secrets.token_hex(32)
    value = secrets.token_hex(32)
    try:  # written whole under a temporary name, then linked: two servers starting at once agree on one key
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
        try:
            os.link(tmp, path)
        except FileExistsError:
            value = path.read_text().strip() or value
        finally:
            tmp.unlink()
    except OSError as e:  # a read-only home: the lists then last until the server restarts
        log.warning("cannot keep the history key in %s (%s): histories last until the server restarts", path, e)
    return value


def sign_runs(run_ids: list[str], key: bytes) -> str:
    """A browser's run ids as the token it keeps: "v1.<base64url JSON list>.<base64url HMAC-SHA256>". Not secret
    (they are the browser's own runs), but only the server can make one that verify_runs accepts."""
    body = base64.urlsafe_b64encode(json.dumps(run_ids, separators=(",", ":")).encode()).decode()
    tag = base64.urlsafe_b64encode(hmac.new(key, f"v1.{body}".encode(), hashlib.sha256).digest()).decode()
    return f"v1.{body}.{tag}"


def verify_runs(token: Any, key: bytes) -> list[str]:
    """The run ids in a token sign_runs made with `key`; [] for anything else (a forged or plain list, another
    key's token, the old encrypted list, garbage): what comes from the browser is never trusted unsigned."""
    if not isinstance(token, str) or len(token) > TOKEN_CHARS or token.count(".") != 2:
        return []
    version, body, tag = token.split(".")
    expected = base64.urlsafe_b64encode(hmac.new(key, f"v1.{body}".encode(), hashlib.sha256).digest()).decode()
    if version != "v1" or not hmac.compare_digest(tag, expected):
        return []
    try:
        run_ids = json.loads(base64.urlsafe_b64decode(body))
    except ValueError:
        return []
    if not isinstance(run_ids, list):
        return []
    return [r for r in run_ids if isinstance(r, str) and RUN_ID.match(r)][-MAX_OWN_RUNS:]


def _remove_legacy_key(outputs_dir: Path) -> None:
    """The key older versions kept in the outputs folder, which Gradio serves: nothing trusts it now."""
    legacy = outputs_dir / LEGACY_KEY_FILE
    try:
        if legacy.is_file() and not legacy.is_symlink():
            legacy.unlink()
            log.info("removed %s: the history key is no longer kept in the outputs folder", legacy)
    except OSError as e:
        log.warning("cannot remove the old history key %s: %s", legacy, e)


class HistoryView:
    """A gallery of past runs; its folders are kept in a State so a click maps back to a run.

    Private by default: each browser sees only the runs it made (their ids live in its BrowserState as a list the
    server signed, and run ids are 96 random bits that no other client is sent); `shared` shows everyone's newest
    runs (PLAYGROUND_SHARED_HISTORY=1, for a private machine)."""

    def __init__(self, app: Playground, shared: bool = False) -> None:
        self.app = app
        self.shared = shared
        self.key = history_key()
        _remove_legacy_key(app.outputs_dir)
        self.mine = gr.BrowserState("", storage_key=STORAGE_KEY, secret=STORAGE_WRAP)  # holds sign_runs' token
        self.folders = gr.State([])
        self.gallery = gr.Gallery(label="Past runs", columns=8, height=260,
                                  fit_columns=False, object_fit="contain", allow_preview=False, elem_id="history",
                                  elem_classes="pixelated", show_label=True)

    def outputs(self, mine: str | None = None, add: str | None = None) -> dict:
        """Gallery and folders, and this browser's signed list of run ids (`mine`, the token from its BrowserState,
        with `add` appended when given; a token that does not verify counts as no runs)."""
        run_ids = verify_runs(mine, self.key)
        if add and add not in run_ids:
            run_ids = [*run_ids, add][-MAX_OWN_RUNS:]
        outputs_dir = self.app.outputs_dir
        items = history(outputs_dir) if self.shared else own_history(outputs_dir, run_ids)
        # The label says how many runs there are, so "none yet" is visibly loaded, not still on its way.
        label = (f"Past runs ({len(items)}; click one to restore its settings)" if items else
                 f"Past runs: none yet{'' if self.shared else ' from this browser'}")
        return {self.gallery: gr.Gallery([(str(Path(f) / "image.png"), c) for f, c in items], label=label),
                self.folders: [f for f, _ in items], self.mine: sign_runs(run_ids, self.key)}

    def on_select(self, controls, live, folders: list[str], evt: gr.SelectData) -> dict:
        """Restore a past run's settings, image, code and (where its steps were kept) its scrubber."""
        index = getattr(evt, "index", None)  # a call from outside the page may bring no event or no list
        if not isinstance(index, int) or not isinstance(folders, list) or not 0 <= index < len(folders):
            return {}
        folder = Path(folders[index])
        try:
            trace = Trace.read(folder)
        except (OSError, ValueError) as e:
            return live.cleared(f"⚠️ **Error:** cannot restore run `{folder.name}`: "
                                f"{client_message(e, self.app.outputs_dir)}")
        req = request_dict(trace)
        out = controls.restore(req, trace.seed)
        out[live.batch] = batch_gallery(folder, tuple(trace.seed + i for i in range(len(trace.images))))
        out |= {live.final_image: str(folder / "image.png"), live.run_id: folder.name, live.progress: "",
                live.cap_final: final_caption(trace.cancelled, len(trace.steps)),
                live.status: f"Restored the settings of run `{folder.name}` (seed {trace.seed}); press Generate to rerun."}
        try:
            request = GenerationRequest(**(req | {"guidance_params": req.get("guidance_params") or {}}))
            out[live.code] = diffusers_script(
                request, seed=trace.seed, width=trace.width, height=trace.height, scheduler=trace.scheduler,
                family=trace.family, stopped_at=len(trace.steps) if trace.cancelled else None,
                dtype=self.app.loader.dtype, device=self.app.loader.device.type, threads=trace.threads)
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
