"""Per-family conditioning and denoiser calls: SD 1.x/2.x, SDXL, PixArt-Σ (T5), SD3 (CLIP+CLIP+T5), Flux.1 (CLIP+T5).

Each family is detected from the loaded pipeline's class (never from the model name) and wraps only the
public parts of that pipeline: `encode_prompt`, `prepare_latents`, `prepare_extra_step_kwargs`, the
denoiser's forward and the VAE. The denoising loop itself lives in pipelines/generate.py.
"""

from __future__ import annotations

import inspect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import (
    Attention,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGCFGJointAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
    PAGJointAttnProcessor2_0,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from guidance.base import Perturbation
from guidance.seg import blur_query


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for one run, batched as diffusers batches it: [uncond, cond] when CFG is on."""

    embeds: torch.Tensor  # (B or 2B, L, D) encoder hidden states
    cfg: bool  # True when the batch holds [uncond, cond]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # pooled embeds, time ids, attention masks

    def select(self, with_uncond: bool, perturbed: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Embeddings for a pass [uncond?, cond, cond-for-the-perturbed-pass?], as diffusers' PAG pipelines batch."""
        if not perturbed and (with_uncond or not self.cfg):
            return self.embeds, self.extra

        def pick(x: torch.Tensor) -> torch.Tensor:
            half = x.shape[0] // 2 if self.cfg else 0
            parts = ([x[:half]] if with_uncond and self.cfg else []) + [x[half:]] + ([x[half:]] if perturbed else [])
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        return pick(self.embeds), {k: pick(v) for k, v in self.extra.items()}


class Family:
    """Base: what differs between model families. Subclasses override what their pipeline does differently."""

    key: str = ""
    pipeline_class: type[DiffusionPipeline] = DiffusionPipeline
    flow: bool = False  # flow matching (velocity prediction) instead of a discrete VP schedule

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.unet

    def prediction_type(self, pipe: Any) -> str:
        """'epsilon', 'v_prediction', 'sample' or 'flow'."""
        return "flow" if self.flow else pipe.scheduler.config.get("prediction_type", "epsilon")

    def size_multiple(self, pipe: Any) -> int:
        """Pixel sizes must be multiples of this: what the stock pipeline's check_inputs demands (8 for SD, SDXL
        and PixArt whatever the VAE), and never less than the VAE factor × patch size."""
        return math.lcm(8, pipe.vae_scale_factor * self.patch_size(pipe))

    def patch_size(self, pipe: Any) -> int:
        return 1

    def default_size(self, pipe: Any) -> int:
        return self.denoiser(pipe).config.sample_size * pipe.vae_scale_factor

    def latent_channels(self, pipe: Any) -> int:
        return self.denoiser(pipe).config.in_channels

    def encode(self, pipe: Any, prompt: str, negative_prompt: str | None, cfg: bool, device: torch.device,
               height: int, width: int, num_images: int = 1) -> Conditioning:
        """Text conditioning for `num_images` images of one prompt, batched [uncond × n, cond × n] with CFG, as the
        stock pipeline's encode_prompt(num_images_per_prompt=n) repeats it; negative_prompt None means diffusers'
        default (\"\" or zeros for SDXL)."""
        raise NotImplementedError

    def cfg_plan(self, pipe: Any, request: Any) -> tuple[float, bool]:
        """(the scale the guidance method applies, whether the run has an unconditional pass) for a
        GenerationRequest. As diffusers: CFG only above scale 1, and never for guidance-distilled (LCM) UNets."""
        if request.true_cfg_scale != 1.0:
            raise ValueError(f"true_cfg_scale is for Flux models (their guidance_scale is an input to the model); "
                             f"this is a {self.key} model, whose CFG scale is guidance_scale: leave true_cfg_scale at "
                             f"1, got {request.true_cfg_scale:g}")
        scale = request.guidance_scale
        return scale, scale > 1.0 and getattr(self.denoiser(pipe).config, "time_cond_proj_dim", None) is None

    def prepare_latents(self, pipe: Any, num_images: int, height: int, width: int, dtype: torch.dtype,
                        device: torch.device, generator: Any) -> torch.Tensor:
        """Initial latents (B, C, h, w) from the stock pipeline's prepare_latents (scaled by init_noise_sigma)."""
        return pipe.prepare_latents(num_images, self.latent_channels(pipe), height, width, dtype, device, generator)

    def timesteps(self, pipe: Any, num_inference_steps: int, device: torch.device, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Set the scheduler's timesteps (before prepare_latents: Euler's init_noise_sigma depends on them)."""
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device)
        return timesteps

    def step_kwargs(self, pipe: Any, generator: torch.Generator) -> dict[str, Any]:
        return pipe.prepare_extra_step_kwargs(generator, 0.0)

    def predict(self, pipe: Any, latent_model_input: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                with_uncond: bool, guidance_scale: float, perturbed: bool = False, traced: Any = None) -> torch.Tensor:
        """Denoiser output for the batch [uncond?, cond, cond-perturbed?] (see Conditioning.select). `traced`: the
        UNet's TorchScript traces (ModelLoader.traced_unet), used where the call is a plain UNet call."""
        raise NotImplementedError

    # PAG: which self-attention layers get the identity map (diffusers' PAG pipelines' defaults), and how.
    pag_layers: tuple[str, ...] = ("mid",)

    def pag_processors(self) -> tuple[Any, Any]:
        """(processor with CFG: batch [uncond, cond, ptb], processor without CFG: batch [cond, ptb])."""
        return PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0()

    # What a guidance block (see guidance_blocks) returns, in order: the name of the input each output replaces.
    block_outputs: tuple[str, ...] = ("hidden_states",)

    def guidance_blocks(self, pipe: Any) -> list[torch.nn.Module]:
        """The transformer blocks that SLG and AutoGuidance skip and SEG blurs the query of, in the extra pass."""
        raise ValueError(f"skip-layer, smoothed-energy and autoguidance passes are not available for {self.key} models; "
                         f"they run on: {', '.join(k for k, f in FAMILIES.items() if f.has_guidance_blocks)}")

    has_guidance_blocks: bool = False  # guidance_blocks() is implemented

    def _pag_attention(self, pipe: Any) -> list[torch.nn.Module]:
        """The self-attention modules PAG perturbs. Adapted from diffusers 0.42.1, PAGMixin._set_pag_attn_processor."""
        model = self.denoiser(pipe)
        modules: list[torch.nn.Module] = []
        for layer in self.pag_layers:
            matched = [
                module for name, module in model.named_modules()
                if isinstance(module, Attention) and not module.is_cross_attention and re.search(layer, name)
                and not _fake_integral_match(layer, name)
            ]
            if not matched:
                raise ValueError(f"PAG: this model has no self-attention layer matching {layer!r}")
            modules += matched
        return modules

    @contextmanager
    def perturbed_pass(self, pipe: Any, perturbation: Perturbation) -> Iterator[PerturbedPass]:
        """Resolve what `perturbation` touches in this model once for a run (refusing a family it does not apply to
        before any step runs); the loop installs it around each model call that has a perturbed part."""
        if perturbation.kind == "identity_attention":
            modules = self._pag_attention(pipe)
        elif perturbation.kind == "skip_blocks":
            modules = self.guidance_blocks(pipe)
        else:  # blur_query: the query projections of the blocks' self-attention
            modules = [m.to_q for block in self.guidance_blocks(pipe) for m in block.modules()
                       if isinstance(m, Attention) and not m.is_cross_attention and isinstance(m.to_q, torch.nn.Linear)]
            if not modules:
                raise ValueError(f"SEG: the {self.key} model's guidance blocks have no self-attention query to blur")
        yield PerturbedPass(perturbation, tuple(modules), self.block_outputs, self.pag_processors())

    def unscale_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> what vae.decode expects."""
        return latents / pipe.vae.config.scaling_factor

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] (unclamped)."""
        vae = pipe.vae
        z = self.unscale_latents(pipe, latents).to(vae.dtype)
        return vae.decode(z, return_dict=False)[0]

    def to_pil(self, pipe: Any, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> list[Image.Image]:
        """Decoded images -> PIL images, with whatever the stock pipeline applies after decoding."""
        return pipe.image_processor.postprocess(images, output_type="pil")

    def call_defaults(self, pipe: Any) -> dict[str, Any]:
        """The stock pipeline's own __call__ defaults for steps and guidance scale (SD 50/7.5, PixArt 20/4.5…)."""
        params = inspect.signature(type(pipe).__call__).parameters
        return {k: params[k].default for k in ("num_inference_steps", "guidance_scale") if k in params}


class SDFamily(Family):
    """SD 1.x / 2.x / Turbo: one CLIP text encoder, UNet, epsilon or v-prediction."""

    key = "sd"
    pipeline_class = StableDiffusionPipeline
    has_guidance_blocks = True

    def guidance_blocks(self, pipe):
        # The mid block's transformer blocks: where PAG perturbs a UNet, and SEG's choice for SD-XL (the authors' code).
        blocks = [m for name, m in pipe.unet.named_modules()
                  if name.startswith("mid_block.") and isinstance(m, BasicTransformerBlock)]
        if not blocks:
            raise ValueError("skip-layer, smoothed-energy and autoguidance passes need a UNet whose mid block has "
                             "transformer blocks (mid_block_type UNetMidBlock2DCrossAttn); this one has none")
        return blocks

    def encode(self, pipe, prompt, negative_prompt, cfg, device, height, width, num_images=1):
        embeds, neg = pipe.encode_prompt(prompt, device, num_images, cfg, negative_prompt)
        return Conditioning(torch.cat([neg, embeds]) if cfg else embeds, cfg)

    def predict(self, pipe, latent_model_input, t, cond, with_uncond, guidance_scale, perturbed=False, traced=None):
        embeds, extra = cond.select(with_uncond, perturbed)
        if traced is not None and not extra and not perturbed and torch.is_tensor(t):
            return traced(pipe.unet, latent_model_input, t, embeds)  # no guidance embedding: traceable() checked
        return pipe.unet(latent_model_input, t, encoder_hidden_states=embeds,
                         timestep_cond=self._timestep_cond(pipe, guidance_scale, latent_model_input),
                         added_cond_kwargs=extra or None, return_dict=False)[0]

    def to_pil(self, pipe, images, device, dtype):
        # As StableDiffusionPipeline: the safety checker (when the model ships one) blacks out flagged images.
        images, nsfw = pipe.run_safety_checker(images, device, dtype)
        denormalize = [True] * images.shape[0] if nsfw is None else [not flag for flag in nsfw]
        return pipe.image_processor.postprocess(images, output_type="pil", do_denormalize=denormalize)

    @staticmethod
    def _timestep_cond(pipe, guidance_scale: float, x: torch.Tensor) -> torch.Tensor | None:
        """Guidance-scale embedding for guidance-distilled UNets (LCM); None for ordinary models."""
        dim = pipe.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.tensor(guidance_scale - 1).repeat(x.shape[0])
        return pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=x.device, dtype=x.dtype)


class SDXLFamily(SDFamily):
    """SDXL: two CLIP encoders, pooled text embeds and size/crop time ids as added conditioning."""

    key = "sdxl"
    pipeline_class = StableDiffusionXLPipeline

    def encode(self, pipe, prompt, negative_prompt, cfg, device, height, width, num_images=1):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=num_images, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt,
        )
        # Adapted from diffusers 0.42.1, StableDiffusionXLPipeline._get_add_time_ids (original size,
        # crop top-left, target size; no micro-conditioning beyond the defaults of __call__).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype, device=device)
        time_ids = time_ids.repeat(num_images, 1)
        if cfg:
            return Conditioning(torch.cat([neg, embeds]), True, {
                "text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])})
        return Conditioning(embeds, False, {"text_embeds": pooled, "time_ids": time_ids})

    def to_pil(self, pipe, images, device, dtype):
        if getattr(pipe, "watermark", None) is not None:  # as StableDiffusionXLPipeline, when the package is there
            images = pipe.watermark.apply_watermark(images)
        return pipe.image_processor.postprocess(images, output_type="pil")

    def unscale_latents(self, pipe, latents):
        cfg = pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std / cfg.scaling_factor + mean
        return latents / cfg.scaling_factor


class PixArtSigmaFamily(Family):
    """PixArt-Σ: T5 encoder with attention masks, DiT with learned-sigma channels (dropped as diffusers does)."""

    key = "pixart_sigma"
    pipeline_class = PixArtSigmaPipeline
    pag_layers = ("blocks.1",)
    has_guidance_blocks = True

    def guidance_blocks(self, pipe):
        return _stack_blocks(pipe.transformer.transformer_blocks)

    def _pag_attention(self, pipe):
        return _dit_pag_attention(self, pipe)

    def denoiser(self, pipe):
        return pipe.transformer

    def patch_size(self, pipe):
        return pipe.transformer.config.patch_size

    def encode(self, pipe, prompt, negative_prompt, cfg, device, height, width, num_images=1):
        # clean_caption=True and 300 tokens are PixArtSigmaPipeline.__call__'s defaults.
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompt, cfg, negative_prompt=negative_prompt or "", num_images_per_prompt=num_images, device=device,
            clean_caption=True, max_sequence_length=300,
        )
        if cfg:
            return Conditioning(torch.cat([neg, embeds]), True, {"encoder_attention_mask": torch.cat([neg_mask, mask])})
        return Conditioning(embeds, False, {"encoder_attention_mask": mask})

    def predict(self, pipe, latent_model_input, t, cond, with_uncond, guidance_scale, perturbed=False, traced=None):
        embeds, extra = cond.select(with_uncond, perturbed)
        timestep = t[None].to(latent_model_input.device) if t.ndim == 0 else t
        out = pipe.transformer(
            latent_model_input, encoder_hidden_states=embeds, encoder_attention_mask=extra["encoder_attention_mask"],
            timestep=timestep.expand(latent_model_input.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
        channels = self.latent_channels(pipe)
        if pipe.transformer.config.out_channels // 2 == channels:
            out = out.chunk(2, dim=1)[0]  # learned sigma: keep the ε half, as PixArtSigmaPipeline does
        return out


class SD3Family(Family):
    """SD3 / SD3.5: two CLIPs + T5, MMDiT, flow matching with optional resolution-dependent shift."""

    key = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    flow = True
    pag_layers = ("blocks.1",)
    has_guidance_blocks = True
    block_outputs = ("encoder_hidden_states", "hidden_states")  # JointTransformerBlock returns the text stream first

    def guidance_blocks(self, pipe):
        return _stack_blocks(pipe.transformer.transformer_blocks)

    def _pag_attention(self, pipe):
        return _dit_pag_attention(self, pipe)

    def pag_processors(self):
        return PAGCFGJointAttnProcessor2_0(), PAGJointAttnProcessor2_0()

    def denoiser(self, pipe):
        return pipe.transformer

    def size_multiple(self, pipe):
        return pipe.vae_scale_factor * pipe.patch_size  # SD3's check_inputs: VAE factor × patch size, no fixed 8

    def encode(self, pipe, prompt, negative_prompt, cfg, device, height, width, num_images=1):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, max_sequence_length=256,
        )
        if cfg:
            return Conditioning(torch.cat([neg, embeds]), True, {"pooled_projections": torch.cat([neg_pooled, pooled])})
        return Conditioning(embeds, False, {"pooled_projections": pooled})

    def timesteps(self, pipe, num_inference_steps, device, latent_hw):
        kwargs = {}
        config = pipe.scheduler.config
        if config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            seq_len = (latent_hw[0] // patch) * (latent_hw[1] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, **kwargs)
        return timesteps

    def step_kwargs(self, pipe, generator):
        return {}  # StableDiffusion3Pipeline passes nothing extra to scheduler.step

    def predict(self, pipe, latent_model_input, t, cond, with_uncond, guidance_scale, perturbed=False, traced=None):
        embeds, extra = cond.select(with_uncond, perturbed)
        return pipe.transformer(
            hidden_states=latent_model_input, timestep=t.expand(latent_model_input.shape[0]),
            encoder_hidden_states=embeds, pooled_projections=extra["pooled_projections"], return_dict=False,
        )[0]

    def unscale_latents(self, pipe, latents):
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor


class FluxFamily(Family):
    """Flux.1 (schnell, dev): CLIP pooled + T5 sequence conditioning, an MMDiT over packed 2×2 latent patches, flow
    matching with a resolution-dependent shift; dev takes its (distilled) guidance scale as an input, true CFG is a
    second pass on the negative prompt (FluxPipeline's true_cfg_scale).

    The loop keeps latents unpacked (B, C, h, w): packing is a permutation and the flow schedulers step elementwise,
    so stepping unpacked latents is the same arithmetic FluxPipeline does on packed ones, and every x̂0 the observer
    sees is a plain latent image. predict() packs before the transformer and unpacks its output.
    """

    key = "flux"
    pipeline_class = FluxPipeline
    flow = True

    def denoiser(self, pipe):
        return pipe.transformer

    def size_multiple(self, pipe):
        return pipe.vae_scale_factor * 2  # FluxPipeline.check_inputs: VAE factor × the 2×2 packing

    def default_size(self, pipe):
        return pipe.default_sample_size * pipe.vae_scale_factor  # 128 × 8 = 1024, as FluxPipeline.__call__

    def latent_channels(self, pipe):
        return pipe.transformer.config.in_channels // 4  # the transformer sees 2×2 patches of C channels

    def cfg_plan(self, pipe, request):
        # guidance_scale is the distilled guidance embedding (one pass, used in predict); true CFG is the second
        # pass, on when true_cfg_scale > 1 (an empty negative prompt is encoded as "", as CFG's unconditional pass)
        return request.true_cfg_scale, request.true_cfg_scale > 1.0

    def encode(self, pipe, prompt, negative_prompt, cfg, device, height, width, num_images=1):
        # max_sequence_length=512 is FluxPipeline.__call__'s default; prompt_2 (T5) is the prompt, as its default
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                               num_images_per_prompt=num_images, max_sequence_length=512)
        if not cfg:
            return Conditioning(embeds, False, {"pooled_projections": pooled})
        neg, neg_pooled, _ = pipe.encode_prompt(prompt=negative_prompt or "", prompt_2=None, device=device,
                                                num_images_per_prompt=num_images, max_sequence_length=512)
        return Conditioning(torch.cat([neg, embeds]), True, {"pooled_projections": torch.cat([neg_pooled, pooled])})

    def prepare_latents(self, pipe, num_images, height, width, dtype, device, generator):
        packed, _ = pipe.prepare_latents(num_images, self.latent_channels(pipe), height, width, dtype, device,
                                         generator)
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)

    def timesteps(self, pipe, num_inference_steps, device, latent_hw):
        # Adapted from diffusers 0.42.1, FluxPipeline.__call__ step 5: sigmas 1 -> 1/N, shift mu from the packed
        # sequence length (used by schedulers with use_dynamic_shifting, as FLUX.1-dev's)
        config = pipe.scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_inference_steps,
                                                                               num_inference_steps)
        mu = flux_calculate_shift(
            (latent_hw[0] // 2) * (latent_hw[1] // 2), config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    def step_kwargs(self, pipe, generator):
        return {}  # FluxPipeline passes nothing extra to scheduler.step

    def _pag_attention(self, pipe):
        raise ValueError("perturbed-attention guidance is not available for Flux models (their attention layers are "
                         "FluxAttention, not the self-attention PAG replaces); choose another guidance method")

    def predict(self, pipe, latent_model_input, t, cond, with_uncond, guidance_scale, perturbed=False, traced=None):
        """Unpacked latents (B, C, h, w) -> velocity (B, C, h, w); with true CFG, one transformer call per
        condition (negative, then positive halves of the batch), as FluxPipeline makes them."""
        if perturbed:  # refused before the run (_pag_attention, guidance_blocks); a guard, not a fallback
            raise ValueError("Flux runs no perturbed pass")
        embeds, extra = cond.select(with_uncond, perturbed)
        batch, channels, h, w = latent_model_input.shape
        dtype, device = latent_model_input.dtype, latent_model_input.device
        packed = pipe._pack_latents(latent_model_input, batch, channels, h, w)
        img_ids = pipe._prepare_latent_image_ids(batch, h // 2, w // 2, device, dtype)
        encoder_dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=encoder_dtype)
        timestep = t.expand(batch).to(dtype) / 1000
        guidance = (torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
                    if pipe.transformer.config.guidance_embeds else None)
        parts = 2 if with_uncond and cond.cfg else 1
        outputs = []
        for chunk in torch.arange(batch).chunk(parts):
            outputs.append(pipe.transformer(
                hidden_states=packed[chunk], timestep=timestep[chunk],
                guidance=None if guidance is None else guidance[chunk],
                pooled_projections=extra["pooled_projections"][chunk], encoder_hidden_states=embeds[chunk],
                txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
            )[0])
        velocity = torch.cat(outputs) if parts > 1 else outputs[0]
        return pipe._unpack_latents(velocity, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                    pipe.vae_scale_factor)

    def unscale_latents(self, pipe, latents):
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor


# Transformer blocks the extra pass of SLG, SEG and AutoGuidance perturbs in a DiT: StabilityAI's SLG layers for SD3.5
# Medium (diffusers' recommended values), or the middle block of a model with fewer than 10 blocks.
GUIDANCE_BLOCKS = (7, 8, 9)


def _stack_blocks(blocks: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """GUIDANCE_BLOCKS of a DiT's block stack where it has them all, else its middle block."""
    if len(blocks) > max(GUIDANCE_BLOCKS):
        return [blocks[i] for i in GUIDANCE_BLOCKS]
    return [blocks[len(blocks) // 2]]


def _dit_pag_attention(family: Family, pipe: Any) -> list[torch.nn.Module]:
    """PAG's layers in a DiT: diffusers' default (blocks.1), or in a one-block model, which has none, its only block's
    self-attention (the block guidance_blocks picks there too)."""
    blocks = pipe.transformer.transformer_blocks
    if len(blocks) > 1:
        return Family._pag_attention(family, pipe)
    return [m for m in blocks[0].modules() if isinstance(m, Attention) and not m.is_cross_attention]


@dataclass(frozen=True)
class PerturbedPass:
    """What one run's perturbation touches, resolved once; install() perturbs one batched model call."""

    perturbation: Perturbation  # what the method asked for
    modules: tuple[torch.nn.Module, ...]  # PAG: self-attention modules; skip: blocks; blur: query projections
    block_outputs: tuple[str, ...]  # skip: the input each block output stands for (Family.block_outputs)
    pag_processors: tuple[Any, Any]  # PAG: (with CFG, without)

    @contextmanager
    def install(self, chunks: int) -> Iterator[None]:
        """Perturb the last of `chunks` equal parts of the next model call's batch ([uncond?, cond, perturbed]),
        through attention processors (PAG) or forward hooks (skip, blur) that are removed on exit."""
        kind = self.perturbation.kind
        if kind == "identity_attention":
            if chunks not in (2, 3):
                raise ValueError(f"PAG's processors take a batch of 2 or 3 parts, got {chunks}")
            # The family's processors on joint (text+image) attention; SD3.5's second, image-only self-attention
            # (attn2 of its dual-attention blocks) takes the plain ones, as a UNet's does
            plain = (PAGCFGIdentitySelfAttnProcessor2_0(), PAGIdentitySelfAttnProcessor2_0())
            originals = [(m, m.processor) for m in self.modules]
            try:
                for module, _ in originals:
                    joint = getattr(module, "added_kv_proj_dim", None) is not None
                    module.set_processor((self.pag_processors if joint else plain)[0 if chunks == 3 else 1])
                yield
            finally:
                for module, original in originals:
                    module.set_processor(original)
            return
        if kind == "skip_blocks":
            hook, with_kwargs = partial(_skip_block, outputs=self.block_outputs, chunks=chunks), True
        else:
            hook, with_kwargs = partial(_blur_query, perturbation=self.perturbation, chunks=chunks), False
        handles = []
        try:
            for module in self.modules:
                handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _perturbed_rows(output: torch.Tensor, replacement: torch.Tensor, chunks: int) -> torch.Tensor:
    """`output` with its last 1/chunks rows (the perturbed pass) taken from `replacement`."""
    keep = output.shape[0] - output.shape[0] // chunks
    return torch.cat([output[:keep], replacement[keep:]])


def _skip_block(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any, *, outputs: tuple[str, ...],
                chunks: int) -> Any:
    """Forward hook: the perturbed rows of a block's outputs are its inputs (the block skipped, diffusers'
    TransformerBlockSkipHook with dropout 1), each output matched to its input by name."""
    inputs = {"hidden_states": kwargs.get("hidden_states", args[0] if args else None),
              "encoder_hidden_states": kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)}
    parts = output if isinstance(output, tuple) else (output,)
    skipped = tuple(part if part is None else _perturbed_rows(part, inputs[name], chunks)
                    for part, name in zip(parts, outputs))
    return skipped if isinstance(output, tuple) else skipped[0]


def _blur_query(module: torch.nn.Module, args: tuple, output: torch.Tensor, *, perturbation: Perturbation,
                chunks: int) -> torch.Tensor:
    """Forward hook on a query projection: the perturbed rows' queries blurred (guidance/seg.py blur_query)."""
    keep = output.shape[0] - output.shape[0] // chunks
    blurred = blur_query(output[keep:], perturbation.blur_sigma, perturbation.blur_threshold_inf)
    return torch.cat([output[:keep], blurred])


def _fake_integral_match(layer: str, name: str) -> bool:
    """'blocks.1' must not match 'blocks.1' inside 'blocks.10' (diffusers' is_fake_integral_match)."""
    a, b = layer.split(".")[-1], name.split(".")[-1]
    return a.isnumeric() and b.isnumeric() and a == b


# Order matters: SDXL before nothing it subclasses; detection is by isinstance on the pipeline class.
FAMILIES: dict[str, Family] = {f.key: f for f in (SDFamily(), SDXLFamily(), PixArtSigmaFamily(), SD3Family(),
                                                   FluxFamily())}


def family_of(pipe: DiffusionPipeline) -> Family:
    """The family of a loaded pipeline, by its class; anything else is refused with the supported list."""
    for family in FAMILIES.values():
        if type(pipe) is family.pipeline_class:
            return family
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class):
            return family
    supported = ", ".join(f.pipeline_class.__name__ for f in FAMILIES.values())
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; supported: {supported}")
