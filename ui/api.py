"""The named HTTP endpoints /generate and /generate_stream: one request shape (plain parameter names and defaults,
the same hidden widgets for both), so `client.predict(prompt=..., api_name="/generate")` and
`client.submit(prompt=..., api_name="/generate_stream")` take the same values; the same request builder as the UI
and the CLI."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable, Iterator

import gradio as gr

from guidance.registry import METHODS
from pipelines.explain.common import seeded
from pipelines.outputs import image_name
from pipelines.requests import MAX_GUIDANCE_SCALE, build_request
from pipelines.schedulers import SCHEDULERS
from pipelines.types import MAX_IMAGES_PER_PROMPT, MAX_STEPS, GenerationRequest
from ui.live import KEEPALIVE_SECONDS, admission_validator, as_gr_error, finished_status, live_steps, starting_status, step_status, waiting_status
from ui.state import Playground, Run

X0_PREVIEW = "fast"  # the API's runs preview x̂0 the cheap way (the UI's x0_preview "fast"); the image is the same


def parameters(default_model: str) -> dict[str, gr.Component]:
    """The request's parameters as hidden widgets: name -> widget holding its default. The one definition of
    /generate's and /generate_stream's parameters (both endpoints take these very widgets)."""
    return dict(
        prompt=gr.Textbox(label="prompt"),
        negative_prompt=gr.Textbox("", label="negative_prompt"),  # "" = none
        model=gr.Textbox(default_model, label="model"),
        scheduler=gr.Textbox("", label="scheduler"),  # "" keeps the model's own
        num_inference_steps=gr.Number(-1, label="num_inference_steps"),  # -1 = the model's recommended
        guidance_scale=gr.Number(-1, label="guidance_scale"),  # -1 = the model's recommended
        seed=gr.Number(-1, label="seed"),  # -1 = random; the seed used comes back
        width=gr.Number(0, label="width"),  # 0 = the model's native size
        height=gr.Number(0, label="height"),
        guidance=gr.Textbox("", label="guidance"),  # "" = the model's recommended method (and its parameters)
        guidance_params=gr.Textbox("", label="guidance_params"),  # JSON object of the method's parameters
        num_images_per_prompt=gr.Number(1, label="num_images_per_prompt"),  # a batch: image i uses seed + i
        true_cfg_scale=gr.Number(1, label="true_cfg_scale"),  # Flux only: true CFG on the negative prompt; 1 = off
    )


def run_info(run: Run) -> dict[str, Any]:
    """The small dict both endpoints return with the image: run folder, scheduler, family, size, steps, seconds."""
    result = run.result
    assert result is not None
    return {"run": run.run_id, "scheduler": result.scheduler, "family": result.family, "width": result.width,
            "height": result.height, "steps_completed": result.steps_completed,
            "seconds": round(result.timings.total, 3), "seeds": list(result.seeds)}


def batch_images(run: Run) -> list[tuple[str, str]]:
    """Every image of the run's batch as (PNG path, caption naming its seed), image i from seed + i; each PNG
    carries the request that makes it alone."""
    result = run.result
    assert result is not None
    return [(str(run.folder / image_name(i)), f"seed {s}") for i, s in enumerate(result.seeds)]


# One line per parameter under Args: Gradio reads "name: description" line by line (a wrapped line would be lost).
GENERATE_DOC = """Make an image with a diffusion model from a text prompt and return it as a PNG (with its settings
written in, as AUTOMATIC1111 does), the seed used and the run's info. Every parameter but the prompt may be left
out; the model's recommended settings are used then. A request over this server's work budget (size × steps) or a
client with too many runs going at once is refused with a message that says what is allowed.

Args:
    prompt: what to draw, in words (at most {prompt_chars} characters), e.g. "a large red circle in the center on a blue background".
    negative_prompt: what to steer away from; "" (default) for none.
    model: which model draws it, one of: {models}. Default: {default_model}.
    scheduler: the sampler; "" (default) keeps the model's own; otherwise one of {schedulers} (the ones that fit the model: flow_euler for flow-matching models, the others for the rest; lcm for LCM-distilled models only).
    num_inference_steps: denoising steps, a whole number from 1 to {max_steps} (the server's budget may allow fewer); -1 (default) takes the model's recommended count.
    guidance_scale: how strongly the image follows the prompt (classifier-free guidance scale), from 0 to {max_scale:g}; -1 (default) takes the model's recommended scale.
    seed: the random seed, a whole number from 0 to 2**63-1; the same seed and settings give the same image. -1 (default) draws one, which comes back with the image.
    width: image width in pixels, a multiple of the model's size factor (8 for most); 0 (default) for the model's native size.
    height: image height in pixels, as width; 0 (default) for the model's native size.
    guidance: the guidance method, one of {methods}; "" (default) takes the model's recommended method.
    guidance_params: the method's parameters as a JSON object, e.g. {{"guidance_rescale": 0.7}} for rescale; "" (default) for their defaults.
    num_images_per_prompt: how many images, 1 (default) to {max_images}: image i uses seed + i.
    true_cfg_scale: Flux models only: true classifier-free guidance against the negative prompt (two model passes a step), from 0 to {max_scale:g}; 1 (default) is off (Flux's distilled guidance, guidance_scale, alone).

Returns:
    the image (PNG), the seed used, the run info (run folder, scheduler, family, size, steps completed, seconds, seeds) and every image of the batch with its seed.
"""


def generate_doc(app: Playground) -> str:
    """/generate's description, with the values this server allows."""
    return GENERATE_DOC.format(prompt_chars=app.limits.max_prompt_chars, models=", ".join(app.models),
                               default_model=app.default_model, schedulers=", ".join(SCHEDULERS),
                               max_steps=MAX_STEPS, max_scale=MAX_GUIDANCE_SCALE, methods=", ".join(METHODS),
                               max_images=MAX_IMAGES_PER_PROMPT)


def api_signature(fn: Callable, inputs: dict[str, gr.Component]) -> inspect.Signature:
    """`fn(http, **values)`'s signature with `values` spelled out as the keyword-only parameters `inputs` names, so
    that Gradio can match the docstring's Args lines to them (the values still arrive as **values)."""
    http = next(iter(inspect.signature(fn).parameters.values()))
    return inspect.Signature([http, *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in inputs)])


class ApiView:
    """Hidden widgets that give /generate and /generate_stream their parameter names and defaults, and the two
    handlers behind them."""

    def __init__(self, app: Playground, gpu: Callable, concurrency_limit: int = 1) -> None:
        self.app = app
        with gr.Group(visible=False):
            self.inputs = parameters(app.default_model)
            self.status = gr.Textbox(label="status")
            self.latents = gr.Image(type="filepath", format="png", label="latents x_t")
            self.x0 = gr.Image(type="filepath", format="png", label="predicted x0")
            self.image = gr.Image(type="filepath", format="png", label="image")
            self.seed = gr.Number(precision=0, label="seed")
            self.info = gr.JSON(label="info")
            self.images = gr.Gallery(type="filepath", format="png", label="images")
            self.button = gr.Button()
            self.stream_button = gr.Button()

        @gpu
        async def run_api(http: gr.Request, **values: Any):
            with self.hold(http):
                request = await asyncio.to_thread(self.request, values)  # may load the model: off the event loop
                run = self.start(request, http)
                # Awaited, not waited on in a thread. A generator that sends nothing new while it waits: after each
                # yield Gradio checks that the client is still there and closes the generator when it went away,
                # as it cancels it on a cancel; either stops the run at its next step and frees the worker.
                try:
                    while not await run.wait(KEEPALIVE_SECONDS):
                        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                finally:
                    if not run.done.is_set():
                        run.latest.cancel()
            if run.error is not None:
                raise as_gr_error(run.error, app.outputs_dir) from None
            yield str(run.folder / "image.png"), run.result.seed, run_info(run), batch_images(run)

        @gpu
        def run_api_stream(http: gr.Request, **values: Any) -> Iterator[tuple]:
            """Make an image (or a batch), streaming (status, x_t preview, x̂0 preview, image, seed, info, images):
            per-step previews of the first image (PNG paths, the newest step only, throttled) with image, info and
            images None, then the final image, the seed used, and the info and images /generate returns. Takes
            /generate's parameters, with the same defaults."""
            with self.hold(http):
                request = self.request(values)
                run = self.start(request, http)
                yield from self.stream(run, request)

        # The docstring is the tool's description on the MCP server and /generate's in the API page (ui/mcp.py);
        # Gradio reads each parameter's description from its Args line, matched by name against the signature.
        run_api.__doc__ = generate_doc(app)
        run_api.__signature__ = api_signature(run_api, self.inputs)
        # One concurrency group with the Generate button's stream: see build_demo. The validator counts each call
        # against its client when it is queued (ui/clients.py).
        validate = admission_validator(app)
        self.button.click(run_api, inputs_kwargs=self.inputs, outputs=[self.image, self.seed, self.info, self.images],
                          api_name="generate", concurrency_id="generate", concurrency_limit=concurrency_limit,
                          validator=validate)
        self.stream_button.click(run_api_stream, inputs_kwargs=self.inputs,
                                 outputs=[self.status, self.latents, self.x0, self.image, self.seed, self.info,
                                          self.images],
                                 api_name="generate_stream", concurrency_id="generate",
                                 concurrency_limit=concurrency_limit, validator=validate)

    def hold(self, http: gr.Request | None):
        """The client's admission for one call (Admission.hold), refused with a gr.Error at its limit."""
        try:
            return self.app.admission.hold(self.app.client_of(http))
        except ValueError as e:
            raise as_gr_error(e, self.app.outputs_dir) from None

    def stream(self, run: Run, request: GenerationRequest) -> Iterator[tuple]:
        """/generate_stream's outputs for `run`: the status and newest previews as it goes, then the image."""
        app = self.app
        try:
            yield starting_status(app, run), None, None, None, request.seed, None, None
            previews = (None, None)
            for item in live_steps(app, run, lambda event: self.previews(run, event.step)):
                if isinstance(item, int):
                    yield waiting_status(item), *previews, None, request.seed, None, None
                    continue
                event, previews = item
                yield step_status(event), *previews, None, request.seed, None, None
            run.done.wait()
            if run.error is not None:
                raise as_gr_error(run.error, app.outputs_dir) from None
            result = run.result
            if run.steps:  # the previews end on the last step
                previews = self.previews(run, len(run.steps) - 1)
            yield (finished_status(run, result), *previews, str(run.folder / "image.png"), result.seed,
                   run_info(run), batch_images(run))
        except Exception as e:  # e.g. a preview that fails to render: one client-safe line (logged), no traceback
            raise as_gr_error(e, app.outputs_dir) from None
        finally:  # the client cancelled or went away: stop the worker at the next step
            if not run.done.is_set():
                run.latest.cancel()

    def request(self, values: dict[str, Any]) -> GenerationRequest:
        """Both endpoints' values -> a validated request, its seed drawn when random (so a stream can show it from
        the start); a gr.Error that says what is allowed when refused."""
        app = self.app
        try:
            model = values.get("model") or app.default_model
            app.check_offered(model)
            # The widgets are named as build_request's keywords (`parameters`).
            request = build_request(**(values | {"model": model}), loader=app.loader, limits=app.limits)
        except ValueError as e:
            raise as_gr_error(e, app.outputs_dir) from None
        return seeded(request)  # drawn now, so a stream shows it from the start

    def start(self, request: GenerationRequest, http: gr.Request | None) -> Run:
        """Queue the run on the worker (the caller holds the client's admission: `hold`)."""
        return self.app.start(request, X0_PREVIEW, getattr(http, "session_hash", None), self.app.client_of(http))

    def previews(self, run: Run, step: int) -> tuple[str | None, str | None]:
        """The x_t and x̂0 previews of `step` (PNG paths), in the live kinds."""
        return self.app.render(run, step, "latents"), self.app.render(run, step, "x0_live")
