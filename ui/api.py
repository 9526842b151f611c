"""The named HTTP endpoint /generate: plain parameter names and defaults, so
`client.predict(prompt=..., api_name="/generate")` works; the same request builder as the UI and the CLI."""

from __future__ import annotations

from typing import Callable

import gradio as gr

from ui.live import as_gr_error, client_of
from ui.state import Playground


class ApiView:
    """Hidden widgets that give /generate its parameter names, and the handler behind them."""

    def __init__(self, app: Playground, gpu: Callable, concurrency_limit: int = 1) -> None:
        self.app = app
        default_model = app.default_model
        with gr.Group(visible=False):
            self.inputs = dict(
                prompt=gr.Textbox(label="prompt"),
                negative_prompt=gr.Textbox("", label="negative_prompt"),
                model=gr.Textbox(default_model, label="model"),
                scheduler=gr.Textbox("", label="scheduler"),
                num_inference_steps=gr.Number(-1, label="num_inference_steps"),
                guidance_scale=gr.Number(-1, label="guidance_scale"),
                seed=gr.Number(-1, label="seed"),
                width=gr.Number(0, label="width"),
                height=gr.Number(0, label="height"),
                guidance=gr.Textbox("", label="guidance"),
                guidance_params=gr.Textbox("", label="guidance_params"),
            )
            self.image = gr.Image(type="filepath", format="png", label="image")
            self.seed = gr.Number(precision=0, label="seed")
            self.info = gr.JSON(label="info")
            self.button = gr.Button()

        @gpu
        async def run_api(http: gr.Request, prompt: str, negative_prompt: str = "", model: str = default_model, scheduler: str = "",
                    num_inference_steps: float = -1, guidance_scale: float = -1, seed: float = -1, width: float = 0,
                    height: float = 0, guidance: str = "", guidance_params: str = ""):
            """Make one image; returns (PNG path with A1111 parameters, seed used, run info). seed -1 is random;
            num_inference_steps / guidance_scale -1 and guidance "" take the model's recommended values; width/height
            0 its native size; scheduler "" keeps the model's own; guidance_params is a JSON object."""
            from pipelines.requests import build_request

            try:
                model = model or default_model
                if model not in app.models:
                    raise ValueError(f"model {model!r} is not offered here; choose one of: {', '.join(app.models)}")
                request = build_request(
                    prompt=prompt, negative_prompt=negative_prompt, model=model, loader=app.loader, scheduler=scheduler,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, width=width,
                    height=height, guidance=guidance, guidance_params=guidance_params, limits=app.limits)
            except ValueError as e:
                raise as_gr_error(e, app.outputs_dir) from None
            # Awaited, not waited on in a thread: when the client cancels or goes away Gradio cancels this task,
            # and Run.wait stops the run at its next step, so the worker is free for the next caller.
            try:
                run = app.start(request, "fast", getattr(http, "session_hash", None), client_of(http))
            except ValueError as e:
                raise as_gr_error(e, app.outputs_dir) from None
            await run.wait()
            if run.error is not None:
                raise as_gr_error(run.error, app.outputs_dir) from None
            result = run.result
            info = {"run": run.run_id, "scheduler": result.scheduler, "family": result.family,
                    "width": result.width, "height": result.height, "steps_completed": result.steps_completed,
                    "seconds": round(result.timings.total, 3)}
            return str(run.folder / "image.png"), result.seed, info

        self.button.click(run_api, inputs_kwargs=self.inputs, outputs=[self.image, self.seed, self.info],
                          api_name="generate", concurrency_id="generate",
                          concurrency_limit=concurrency_limit)  # one group with the Generate stream: see build_demo
