"""What is known about one loaded model, resolved once and handed down: its recommended settings, the schedulers
that fit it (and why the others do not), its sizes and weight class, its latent format and which preview each view
shows, its vocabulary and note. The loader builds one per loaded model (ModelLoader.profile) and drops it with the
model; the request builder, the UI, the Explain lab, the trace writer and the CLI read it instead of working the same
facts out again. Thread counts depend on the size of a run too: ModelLoader.threads (pipelines/threads.py).

After ComfyUI's comfy/latent_formats.py: one record per model, read by everyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from pipelines.families import family_of
from pipelines.previews import LatentFormat, Previewer, resolve_kind
from pipelines.registry import MODELS, model_vocabulary, resolve, tier_of
from pipelines.schedulers import (SCHEDULERS, check_fits, compatible_keys, denoiser_config, folder_config,
                                  folder_denoiser_config, why_not)

# Images up to this many pixels are VAE-decoded outside the loop (scrubber, experiments); a decode competes with the
# loop on a CPU, so the live x̂0 there uses the fast preview. Larger images use the fast preview everywhere.
DECODE_PIXELS = {"cpu": 256 * 256, "cuda": 1024 * 1024}
PREVIEW_CHOICES = ("auto", "fast", "decode")  # the UI's x̂0 preview choice


@dataclass(frozen=True)
class Recommended:
    """Settings a run takes when the user leaves them unset."""

    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None  # registry key; None keeps the model's own
    guidance: str = "cfg"  # guidance method key (guidance/registry.py)
    guidance_params: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PreviewPolicy:
    """Which preview kind each view shows for one model on one device: the cheapest faithful kind, in one table."""

    offered: tuple[str, ...]  # kinds this model offers, cheapest first (pipelines.previews.KIND_LABELS)
    fast: str  # the cheapest colour preview short of a full decode ('channels' when the model has none)
    decode_pixels: int  # images up to this many pixels are VAE-decoded outside the loop on this device
    on_cpu: bool  # a live decode would compete with the loop for the CPU
    offload: bool  # model CPU offload: nothing decodes outside the loop (accelerate would move the VAE mid-step)

    def view_kinds(self, choice: str, pixels: int) -> tuple[str, str, str]:
        """(live x_t, scrubber x̂0, live x̂0) for the UI's x̂0 choice ('auto', 'fast' or 'decode') at `pixels`."""
        if choice not in PREVIEW_CHOICES:
            raise ValueError(f"unknown x̂0 preview {choice!r}; choose one of: {', '.join(PREVIEW_CHOICES)}")
        if self.offload or choice == "fast":
            return self.fast, self.fast, self.fast
        if choice == "decode" or pixels <= self.decode_pixels:
            live = "decode" if choice == "decode" or not self.on_cpu or self.fast == "channels" else self.fast
            return self.fast, "decode", live
        return self.fast, self.fast, self.fast

    def experiment_x0(self, pixels: int) -> str:
        """The Explain lab's x̂0 images: decoded where the scrubber decodes, else the fast preview."""
        return self.view_kinds("auto", pixels)[1]

    def cli_x0(self) -> str:
        """The CLI trace's x̂0 previews: on a CPU the fast preview where the model has a faithful one (a tiny decoder,
        TAESD or a colour map: a full VAE decode every step would cost more than the step), else decoded."""
        return self.fast if self.on_cpu and self.fast != "channels" else "decode"

    def kind(self, wanted: str) -> str:
        """A named kind, or 'fast' for this model's fast one; refuses a kind the model does not offer."""
        return resolve_kind(wanted, self.offered, self.fast)


@dataclass(frozen=True)
class ModelProfile:
    """Everything the floors above the loop need to know about one model."""

    model: str  # registry key, folder or hub id, as the user named it
    family: str  # "sd", "sdxl", "pixart_sigma", "sd3"
    prediction_type: str  # "epsilon", "v_prediction", "sample" or "flow"
    recommended: Recommended
    schedulers: tuple[str, ...]  # registry keys that fit the model
    refused: Mapping[str, str]  # registry key -> why it does not fit
    native_size: int  # side in pixels that width / height 0 render
    size_multiple: int  # width and height must be multiples of this
    tier: str  # weight class for budgets: "small", "standard", "heavy" (pipelines/limits.py)
    latent_format: LatentFormat
    previews: PreviewPolicy
    vocabulary: frozenset[str] | None  # words of a closed-vocabulary model; None: open text
    note: str  # one line for the UI ("" outside the registry)

    @property
    def small(self) -> bool:
        return self.tier == "small"


def recommended_for(model: str, pipe: Any | None) -> Recommended:
    """The registry's settings for its models (no weights needed); else the stock pipeline's own __call__ defaults,
    so an unknown folder behaves as diffusers would (needs the loaded pipe)."""
    entry = MODELS.get(model)
    if entry is not None:
        return Recommended(entry.steps, entry.guidance_scale, entry.scheduler, entry.guidance,
                           dict(entry.guidance_params))
    if pipe is None:
        raise ValueError(f"model {model!r} is not in the registry: its recommended settings need the loaded model")
    defaults = family_of(pipe).call_defaults(pipe)
    return Recommended(int(defaults.get("num_inference_steps", 20)), float(defaults.get("guidance_scale", 7.5)), None)


def build_profile(model: str, pipe: Any, previewer: Previewer, device_type: str, offload: bool) -> ModelProfile:
    """The profile of a loaded pipeline (its own scheduler, not a view's) on a device."""
    family = family_of(pipe)
    fast = previewer.fast_kind
    policy = PreviewPolicy(offered=previewer.kinds, fast=fast,
                           decode_pixels=DECODE_PIXELS.get(device_type, DECODE_PIXELS["cpu"]),
                           on_cpu=device_type == "cpu", offload=offload)
    denoiser = denoiser_config(pipe)
    refused = {k: r for k in SCHEDULERS if (r := why_not(k, pipe.scheduler, denoiser)) is not None}
    entry = MODELS.get(model)
    return ModelProfile(
        model=model, family=family.key, prediction_type=family.prediction_type(pipe),
        recommended=recommended_for(model, pipe), schedulers=tuple(compatible_keys(pipe.scheduler, denoiser)),
        refused=refused,
        native_size=family.default_size(pipe), size_multiple=family.size_multiple(pipe), tier=tier_of(model, pipe),
        latent_format=previewer.format, previews=policy, vocabulary=model_vocabulary(model),
        note=entry.note if entry else "")


def fitting_schedulers(model: str, pipe: Any | None) -> tuple[str, ...]:
    """Registry keys of the samplers that fit `model`, known before it loads where they can be: the loaded pipeline's
    (as its profile has them); a local folder's, from the scheduler and UNet configs it ships (read, no weights);
    for a hub id its schedule kind's samplers (any kind outside the registry), less those only a distilled model can
    run, until it loads."""
    if pipe is not None:
        return tuple(compatible_keys(pipe.scheduler, denoiser_config(pipe)))
    source = resolve(model)
    config = folder_config(source)
    if config is not None:
        return tuple(compatible_keys(config, folder_denoiser_config(source)))
    entry = MODELS.get(model)
    kind = entry.schedule if entry is not None else None
    return tuple(k for k, s in SCHEDULERS.items() if (kind is None or s.kind == kind) and not s.distilled_only)


def check_scheduler(model: str, key: str, pipe: Any | None) -> None:
    """Refuse a scheduler that does not fit `model` as the loop would (schedulers.check_fits), before the run is queued
    where it can be known: on the loaded pipeline, else on a local folder's configs (read, no weights). A hub id not
    yet loaded is checked when it loads (its configs are not on this machine); an unknown key is refused at once."""
    if pipe is not None:
        return check_fits(key, pipe.scheduler, denoiser_config(pipe))
    source = resolve(model)
    config = folder_config(source)
    if config is not None:
        return check_fits(key, config, folder_denoiser_config(source))
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {key!r}; choose one of: {', '.join(SCHEDULERS)}")


def size_note(native: int, width: int, height: int) -> str:
    """What to expect at width x height from a model trained at native x native; "" at its own size. A UNet makes
    what it learned at every place of the latent, so a larger canvas gets more than one subject and a smaller one too
    little room for one (Stable Diffusion 1.x at 1024² is the known case: doubled heads and bodies)."""
    if width == native and height == native:
        return ""
    trained = f"this model was trained at {native}×{native}; at {width}×{height} expect"
    if width >= native and height >= native:
        return f"{trained} repeated or duplicated objects and a layout that does not hold together"
    if width <= native and height <= native:
        return f"{trained} cramped, broken shapes and lost detail: it never saw images this small"
    return f"{trained} stretched or repeated objects along the longer side and cut-off ones along the shorter"
