"""The playground UI (top floor): env vars, build_demo() wiring the views in ui/, launch under __main__.

Gradio is a shell here: every image is made by pipelines.generate.generate(), on the one generation worker
(pipelines/worker.py), observed by a LatestObserver that keeps only the newest step for the browser.
`build_demo(...)` takes its dependencies (loader, models, output folder) so tests can start it around tiny
real pipelines; `python app.py` launches it on GRADIO_SERVER_NAME/PORT.
"""

from __future__ import annotations

try:  # Hugging Face Spaces (ZeroGPU): import before torch touches CUDA; a no-op decorator elsewhere.
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import torch
from starlette.middleware import Middleware

from pipelines.limits import Limits
from pipelines.loading import ModelLoader
from pipelines.outputs import clean_orphans
from pipelines.registry import extra_models_from_env, offered_models
from pipelines.types import DEFAULT_MODEL
from pipelines.worker import GenerationWorker
from ui.api import ApiView
from ui.controls import KEYS_JS, Controls
from ui.explain import EXPERIMENT_IMAGE_BYTES, ExplainView
from ui.history import LEGACY_KEY_FILE, HistoryView, key_file as history_key_file
from ui.live import LiveView, generate_handler
from ui.mcp import TOOLS as MCP_TOOLS, McpClientTag
from ui.pnginfo import UPLOADS as PNG_UPLOADS, PngInfoView
from ui.sliders import HEAD as SLIDERS_HEAD
from ui.state import Playground
from ui.theme import CSS, theme
from ui.uploads import NO_UPLOADS, UploadGate, UploadLimits

ROOT = Path(__file__).resolve().parent


class _Blocks(gr.Blocks):
    """gr.Blocks whose launch() brings the playground's CSS, theme and keyboard shortcuts, serves the outputs folder,
    keeps the history key out of reach, refuses uploads beyond `uploads` (UploadGate) and, with `mcp`, serves the
    tools of ui/mcp.py over MCP (Gradio's MCP server, at /gradio_api/mcp) to each caller under its own limits."""

    outputs_dir: Path
    uploads: UploadLimits = NO_UPLOADS  # what Gradio's upload route may take
    playground: Playground  # set by build_demo
    mcp: bool = False  # launch()'s default for mcp_server (build_demo's `mcp`)

    def launch(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("css", CSS)
        kwargs.setdefault("max_file_size", "1mb")  # Gradio's own bound, behind UploadGate's
        kwargs.setdefault("theme", theme())
        kwargs["head"] = f"{kwargs.get('head') or ''}<script>{KEYS_JS}</script>"  # Ctrl/Cmd+Enter generates
        kwargs["head"] += SLIDERS_HEAD  # a typed value outside a slider's range is kept and refused, not clamped
        kwargs["allowed_paths"] = [*(kwargs.get("allowed_paths") or []), str(self.outputs_dir)]
        # The key signs every browser's list of runs: no route may serve it, nor the old one where it could not be
        # removed (ui/history.py).
        blocked = [str(self.outputs_dir / LEGACY_KEY_FILE)]
        key = history_key_file()
        if key is not None:
            served = [p for p in kwargs["allowed_paths"] if key.resolve().is_relative_to(Path(p).resolve())]
            if served:
                raise ValueError(f"the history key {key} is inside a folder the server serves ({served[0]}); set "
                                 "PLAYGROUND_SECRET, or XDG_CACHE_HOME to a private folder")
            blocked.append(str(key))
        kwargs["blocked_paths"] = [*(kwargs.get("blocked_paths") or []), *blocked]
        app_kwargs = dict(kwargs.get("app_kwargs") or {})
        gate = Middleware(UploadGate, limits=self.uploads, trusted_proxy_hops=self.playground.trusted_proxy_hops)
        app_kwargs["middleware"] = [*(app_kwargs.get("middleware") or []), gate]
        kwargs.setdefault("mcp_server", self.mcp)
        if kwargs["mcp_server"]:
            # Gradio calls a tool through a loopback client from 127.0.0.1: the tag carries the MCP caller's own
            # address to the admission (ui/mcp.py).
            app_kwargs["middleware"].append(Middleware(McpClientTag, key=self.playground.mcp_key,
                                                       trusted_proxy_hops=self.playground.trusted_proxy_hops))
            app_kwargs["lifespan"] = self._mcp_tools(app_kwargs.get("lifespan"))
        kwargs["app_kwargs"] = app_kwargs
        # Run files are written once (atomically) and never changed, so Gradio may serve them where they are: a
        # copy into its cache per streamed preview cost ~6 ms of the server's Python, taken from the loop.
        # (Process-wide in Gradio: the last launched playground's outputs folder.)
        gr.set_static_paths([self.outputs_dir])
        # uvicorn rewrites the client address from X-Forwarded-For when the peer is in FORWARDED_ALLOW_IPS (default
        # 127.0.0.1): a local caller could then forge six addresses and get six clients' slots. The playground reads
        # the header itself, only as far as PLAYGROUND_TRUSTED_PROXY_HOPS says (ui/clients.py). Process-wide: read by
        # uvicorn when launch() builds its server.
        os.environ["FORWARDED_ALLOW_IPS"] = ""
        return super().launch(*args, **kwargs)

    def _mcp_tools(self, lifespan: Callable | None) -> Callable:
        """A lifespan that, once Gradio has built its MCP server and before the server takes a request, keeps only
        ui/mcp.py's TOOLS, under their names (Gradio would offer every public endpoint, named after its handler:
        run_api, run_api_stream, run_jump, ...). Tool listing, /gradio_api/mcp/schema and tool calls all read
        this one map."""
        @contextlib.asynccontextmanager
        async def tools(app: Any):
            server = self.mcp_server_obj
            if server is not None:
                offered = set(server.tool_to_endpoint.values())
                # On a Space Gradio prefixes each tool with the Space's name, so an agent can tell two Spaces apart.
                server.tool_to_endpoint = {server.tool_prefix + name: e for name, e in MCP_TOOLS.items()
                                           if e in offered}
            async with contextlib.AsyncExitStack() as stack:
                if lifespan is not None:
                    await stack.enter_async_context(lifespan(app))
                yield
        return tools


def default_loader(models: list[str], limits: Limits | None = None) -> ModelLoader:
    """CUDA (fp16, or PLAYGROUND_DTYPE=bf16/fp32) when there is one, else CPU fp32; PLAYGROUND_CPU_OFFLOAD=1 offloads;
    a loaded model is held Limits.model_switch_seconds before another may replace it (no reload thrashing);
    PLAYGROUND_TRACE=0 runs small CPU UNets eagerly instead of through TorchScript traces (pipelines/traced.py)."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    name = os.environ.get("PLAYGROUND_DTYPE")
    if name is not None and name not in dtypes:
        raise ValueError(f"PLAYGROUND_DTYPE must be one of: {', '.join(dtypes)}; got {name!r}")
    trace = os.environ.get("PLAYGROUND_TRACE", "1")
    if trace not in ("0", "1"):
        raise ValueError(f"PLAYGROUND_TRACE must be 0 or 1; got {trace!r}")
    return ModelLoader(dtype=dtypes[name] if name else None, allowed=models,
                       offload=os.environ.get("PLAYGROUND_CPU_OFFLOAD") == "1",
                       switch_cooldown=(limits or Limits()).model_switch_seconds, trace=trace == "1")


def build_demo(
    loader: ModelLoader | None = None,
    models: list[str] | None = None,
    outputs_dir: str | os.PathLike = ROOT / "outputs",
    default_model: str | None = None,
    preview_interval: float = 0.25,
    worker: GenerationWorker | None = None,
    max_runs_per_client: int | None = None,
    limits: Limits | None = None,
    concurrent_streams: int = 16,
    shared_history: bool = False,
    experiment_image_bytes: int = EXPERIMENT_IMAGE_BYTES,
    gpu: Callable[[Callable], Callable] = gpu,
    trusted_proxy_hops: int = 0,
    mcp: bool = True,
) -> gr.Blocks:
    """The playground page. `models` is the allow-list (default: the embedded model, the curated hub list and
    PLAYGROUND_EXTRA_MODELS); `default_model` the initial choice (default: PLAYGROUND_DEFAULT_MODEL or the
    first model); `preview_interval` the shortest time between two live previews, in seconds; `worker` the
    generation thread (default: a new one, started on the first run); `max_runs_per_client` how many runs one
    address may have waiting or running (None: no limit); `limits` the work budget, run time limit and
    retention (default: the built-in Limits(); `python app.py` reads PLAYGROUND_* variables); `concurrent_streams` how many Generate events Gradio lets in
    at once: they then wait on the one worker, which tells each its place, instead of in Gradio's queue;
    `shared_history` shows every visitor everyone's runs (default: each browser sees its own);
    `experiment_image_bytes` the decoded x̂0 images one Explain-lab jump or dissection keeps in memory; `gpu` the
    decorator of every handler that runs the model (spaces.GPU on ZeroGPU, else none); `trusted_proxy_hops` how many
    proxies in front of the server append to X-Forwarded-For (0: the client is the TCP peer; ui/clients.py); `mcp`
    whether launch() also serves /generate and /png_info as MCP tools (ui/mcp.py; PLAYGROUND_MCP=0 turns it off)."""
    limits = limits or Limits()
    if models is None:  # heavy hub models only where the hardware can run them (Limits.heavy_allowed)
        device = loader.device.type if loader is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        models = list(dict.fromkeys([DEFAULT_MODEL, *offered_models(device, limits.heavy_allowed(device),
                                                                    extra_models_from_env())]))
    default_model = default_model or os.environ.get("PLAYGROUND_DEFAULT_MODEL") or models[0]
    if default_model not in models:
        raise ValueError(f"default model {default_model!r} is not offered; choose one of: {', '.join(models)}")
    loader = loader or default_loader(models, limits)
    outputs_dir = Path(outputs_dir)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    clean_orphans(outputs_dir)  # what a killed process left; before any run of this one
    app = Playground(loader, models, default_model, outputs_dir, preview_interval, worker,
                     max_runs_per_client=max_runs_per_client, limits=limits, trusted_proxy_hops=trusted_proxy_hops)

    # Gradio's own cache (the API's returned files, anything uploaded) is swept hourly of files older than a day.
    with _Blocks(title="Diffusion playground", delete_cache=(3600, 86400)) as demo:
        demo.outputs_dir = outputs_dir
        demo.playground = app  # tests and benchmarks reach the worker through it
        demo.mcp = mcp
        gr.Markdown("## Diffusion playground\nType a prompt, pick a model, scheduler and guidance, and watch the "
                    "image form: the noisy latents x_t and the model's guess of the clean image x̂0 at every step.")
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=2, min_width=320, elem_id="controls-col"):
                controls = Controls(app)
            with gr.Column(scale=5, elem_id="result-col"):
                live = LiveView(app)
        with controls.settings_block:  # at the end of the settings; the one upload the page takes
            pnginfo = PngInfoView(app, controls, live.run_id)
        demo.uploads = PNG_UPLOADS
        gr.Markdown("### History")
        history = HistoryView(app, shared=shared_history)
        gr.Markdown("### Explain lab\nWhy many small steps? Experiments on the settings above.")
        explain = ExplainView(app, controls, experiment_image_bytes, gpu)
        ApiView(app, gpu, concurrency_limit=concurrent_streams)

        run_ui = generate_handler(app, controls, live, gpu)

        def after_run(rid: str, mine: list[str]):
            return live.after_run(rid) | history.outputs(mine, add=rid or None)

        # The stream sends only what changes while a run goes; the scrubber, code and history follow (ui/live.py).
        # always_last: a click while the previous run is still finishing runs next instead of being dropped.
        common = dict(inputs_kwargs=controls.inputs, outputs=[*live.live_outputs, controls.seed], show_progress="minimal",
                      show_progress_on=live.status, concurrency_id="generate", trigger_mode="always_last")
        # No validator here, unlike /generate and the Explain lab: Gradio's page showed a validation refusal at the
        # prompt box only sometimes; refused in the handler (a few ms, concurrency 16), the status line and a
        # warning say so every time.
        then = dict(fn=after_run, inputs=[live.run_id, history.mine],
                    outputs=[*live.after_outputs, history.gallery, history.folders, history.mine],
                    show_progress="hidden", api_visibility="private")
        # Private: the API's stream is /generate_stream (ui/api.py), with /generate's parameters, not these widgets.
        gen_event = controls.generate_btn.click(run_ui, api_visibility="private", concurrency_limit=concurrent_streams,
                                                **common)
        gen_event.then(**then)
        submit_event = controls.prompt.submit(run_ui, api_visibility="private", **common)
        submit_event.then(**then)
        for trigger in (controls.generate_btn.click, controls.prompt.submit):  # the last run's scrubber goes at once
            trigger(live.hide_scrubber, outputs=[live.scrub_group, live.batch], queue=False, show_progress="hidden",
                    api_visibility="private")
        outputs = [*live.outputs, controls.seed, history.gallery, history.folders, history.mine]

        def stop_ui(mine: list[str], http: gr.Request):
            out = live.stop(getattr(http, "session_hash", None))
            return out | history.outputs(mine, add=out.get(live.run_id))

        # Gradio stops streaming the run (cancels=); the observer's flag stops the loop itself within one step.
        controls.stop_btn.click(stop_ui, inputs=[history.mine], outputs=outputs, cancels=[gen_event, submit_event], queue=False,
                                api_visibility="private")
        live.wire_scrub()
        controls.wire()
        explain.wire()
        history.wire(demo, controls, live)
        pnginfo.wire(demo)
    return demo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself when server_name/server_port are not given.
    try:
        limits = Limits.from_env(os.environ)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    per_client = os.environ.get("PLAYGROUND_MAX_RUNS_PER_CLIENT") or "4"
    if not per_client.isdigit() or int(per_client) < 1:
        raise SystemExit(f"error: PLAYGROUND_MAX_RUNS_PER_CLIENT must be a whole number >= 1, got {per_client!r}")
    per_client = int(per_client)
    hops = os.environ.get("PLAYGROUND_TRUSTED_PROXY_HOPS") or ("1" if os.environ.get("SPACE_ID") else "0")
    if not hops.isdigit():
        raise SystemExit(f"error: PLAYGROUND_TRUSTED_PROXY_HOPS must be a whole number >= 0 (how many proxies in front "
                         f"of the server append to X-Forwarded-For; 1 on a Hugging Face Space), got {hops!r}")
    mcp = os.environ.get("PLAYGROUND_MCP") or "1"
    if mcp not in ("0", "1"):
        raise SystemExit(f"error: PLAYGROUND_MCP must be 1 (serve /generate and /png_info as MCP tools, the default) "
                         f"or 0 (no MCP server), got {mcp!r}")
    try:  # PLAYGROUND_DTYPE / PLAYGROUND_TRACE / PLAYGROUND_DEFAULT_MODEL values that are not allowed
        demo = build_demo(outputs_dir=os.environ.get("PLAYGROUND_OUTPUTS") or ROOT / "outputs", limits=limits,
                          max_runs_per_client=per_client, shared_history=os.environ.get("PLAYGROUND_SHARED_HISTORY") == "1",
                          trusted_proxy_hops=int(hops), mcp=mcp == "1")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    demo.playground.warm_up()  # load and trace the default model on the worker while the server starts
    demo.queue(max_size=int(os.environ.get("PLAYGROUND_QUEUE_SIZE") or 64)).launch(show_error=True)
