"""Tiny random pipelines for every model family, built from configs in code (no downloads).

The component configs follow diffusers' own `get_dummy_components` in its pipeline tests; the tokenizers
are built here (byte-level CLIP BPE without merges, a word-level T5) because the test hub repos are not
reachable offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

FAMILIES = ("sd", "sdxl", "pixart_sigma", "sd3", "flux")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-unicode table (as in transformers' CLIP tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A real CLIPTokenizer over a byte-level vocab (514 tokens): every string tokenizes, char by char."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    d = Path(tempfile.mkdtemp(prefix="tiny-clip-tok-"))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=max_length)


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level T5-style tokenizer (pad=0, eos=1, unk=2) that appends </s>, like T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "a an the red green blue yellow purple orange white black circle square star heart triangle cat dog photo of on in".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _clip_config(**kw) -> CLIPTextConfig:
    base = dict(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32,
    )
    return CLIPTextConfig(**(base | kw))


def _t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def tiny_sd(prediction_type: str = "epsilon", zero_snr: bool = False) -> StableDiffusionPipeline:
    """SD 1.x/2.x shape: one CLIP text encoder, UNet with cross-attention, VAE factor 2, PNDM scheduler; zero_snr:
    v-prediction on the zero-terminal-SNR schedule with trailing timesteps and a DDIM scheduler, as tiny-shapes v2."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    )
    if zero_snr:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  steps_offset=1, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing")
    else:
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config(hidden_size=32, intermediate_size=64, num_attention_heads=8, num_hidden_layers=3))
    return StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL shape: two CLIP encoders (second with projection), text_time added conditioning, Euler scheduler."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    return StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(), image_encoder=None, feature_extractor=None,
    )


def tiny_pixart_sigma() -> PixArtSigmaPipeline:
    """PixArt-Σ shape: T5 encoder, DiT with learned-sigma output channels (8 = 2 × 4), DPM-Solver scheduler."""
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2)
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    torch.manual_seed(0)
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5(), vae=vae, transformer=transformer,
                               scheduler=scheduler)


def tiny_sd3() -> StableDiffusion3Pipeline:
    """SD3 shape: two CLIPs with projection + T5, MMDiT, flow matching."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(0)
    text_encoder_3 = _t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5_tokenizer(), transformer=transformer, vae=vae, image_encoder=None, feature_extractor=None,
    )


def tiny_flux(guidance_embeds: bool = True) -> FluxPipeline:
    """Flux.1 shape, after diffusers' tests/pipelines/flux/test_pipeline_flux.py: CLIP (pooled) + T5, a one double-
    and one single-stream block transformer over packed 2×2 patches, but with Flux's 16 latent channels (in_channels
    64) and a two-level VAE (factor 2). guidance_embeds: FLUX.1-dev's distilled guidance input (with its dynamic
    shift); False: FLUX.1-schnell's shape (no guidance input, no dynamic shift)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(0)
    text_encoder_2 = _t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=16, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    # FLUX.1-dev's scheduler config shifts by the image size (mu); schnell's uses a fixed shift of 1
    scheduler = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                 max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler())
    return FluxPipeline(
        scheduler=scheduler, text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(), transformer=transformer, vae=vae, image_encoder=None, feature_extractor=None,
    )


def tiny_pipeline(family: str):
    """Build the tiny pipeline of a family key."""
    builders = {"sd": tiny_sd, "sd_v": lambda: tiny_sd("v_prediction"), "sd_zsnr": lambda: tiny_sd(zero_snr=True),
                "sdxl": tiny_sdxl,
                "pixart_sigma": tiny_pixart_sigma, "sd3": tiny_sd3, "flux": tiny_flux,
                "flux_schnell": lambda: tiny_flux(guidance_embeds=False)}
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of: {', '.join(builders)}")
    pipe = builders[family]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # as from_pretrained leaves them: T5's dropout would otherwise make runs random
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Sizes that are valid for each tiny model (VAE factor × patch size divides them) and fast.
TINY_SIZE = {"sd": 32, "sd_v": 32, "sd_zsnr": 32, "sdxl": 32, "pixart_sigma": 32, "sd3": 32, "flux": 32,
             "flux_schnell": 32}


def tiny_sd_with_safety_checker(flag_everything: bool = False) -> StableDiffusionPipeline:
    """tiny_sd plus a tiny random safety checker; `flag_everything` sets its thresholds so every image is flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = tiny_pipeline("sd")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=100, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    if flag_everything:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-10.0)
    components = pipe.components | {"safety_checker": checker,
                                     "feature_extractor": CLIPImageProcessor(crop_size=32, size=32)}
    out = StableDiffusionPipeline(**components, requires_safety_checker=True)
    out.set_progress_bar_config(disable=True)
    return out
