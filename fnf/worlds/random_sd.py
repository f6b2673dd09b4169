"""Random-weight, SD1.x-, SDXL-, SD3- and FLUX.1-shaped pipelines saved in diffusers format: for tests and benchmarks.

No hub is reachable here, so tests and speed measurements build their own models; they go through
the same loading code (``Text2ImageModel.from_pretrained``) as a downloaded Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from fnf.worlds.tokenizer import build_clip_tokenizer, build_t5_like_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "top", "bottom", "left", "right", "and"]


def build_random_sd(directory: str | Path, latent_side: int = 8, block_out_channels: tuple[int, ...] = (32, 64),
                    text_width: int = 32, seed: int = 0) -> Path:
    """Save a random SD1.x-layout pipeline: VAE factor 2, images of side 2·latent_side."""
    directory = Path(directory)
    torch.manual_seed(seed)
    unet, vae = _unet(latent_side, block_out_channels, text_width), _vae(latent_side)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder(CLIPTextModel, tokenizer, text_width), tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory


def build_random_sdxl(directory: str | Path, latent_side: int = 8, block_out_channels: tuple[int, ...] = (32, 64),
                      text_width: int = 32, seed: int = 0) -> Path:
    """Save a random SDXL-layout pipeline: two text encoders (the second with a projection), ``text_time``
    added conditioning (pooled text + 6 size ids), VAE factor 2."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(WORDS, directory / "tokenizer_2")
    time_dim = 8
    unet = _unet(latent_side, block_out_channels, 2 * text_width, addition_embed_type="text_time",
                 addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + text_width)
    StableDiffusionXLPipeline(
        vae=_vae(latent_side), text_encoder=_text_encoder(CLIPTextModel, tokenizer, text_width),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, tokenizer_2, text_width), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    ).save_pretrained(directory)
    return directory


def build_random_sd3(directory: str | Path, latent_side: int = 8, text_width: int = 32, t5: bool = True,
                     shift: float = 3.0, seed: int = 0) -> Path:
    """Save a random SD3-layout pipeline: an MMDiT (patch 2), two CLIP encoders with projections, an optional T5
    (16 tokens), flow-matching scheduler with a fixed ``shift``, VAE factor 2 with a shift factor."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(WORDS, directory / "tokenizer_2")
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=2 * text_width, caption_projection_dim=32,
        pooled_projection_dim=2 * text_width, pos_embed_max_size=latent_side,
    )
    tokenizer_3 = build_t5_like_tokenizer(WORDS, directory / "tokenizer_3", model_max_length=16) if t5 else None
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=_vae(latent_side, 0.1),
        text_encoder=_text_encoder(CLIPTextModelWithProjection, tokenizer, text_width), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, tokenizer_2, text_width), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, 2 * text_width) if t5 else None, tokenizer_3=tokenizer_3,
    ).save_pretrained(directory)
    return directory


def build_random_flux(directory: str | Path, latent_side: int = 8, text_width: int = 32, guidance: bool = True,
                      seed: int = 0) -> Path:
    """Save a random FLUX.1-layout pipeline: double- and single-stream blocks, CLIP-L pooled text, T5 tokens
    (16), dev-style guidance embedding (``guidance``) or schnell-style none, dynamic (resolution) shifting."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    tokenizer_2 = build_t5_like_tokenizer(WORDS, directory / "tokenizer_2", model_max_length=16)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_width, pooled_projection_dim=text_width, guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=4, max_image_seq_len=64)
    FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_vae(latent_side, 0.1),
        text_encoder=_text_encoder(CLIPTextModel, tokenizer, text_width), tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2, text_width), tokenizer_2=tokenizer_2,
    ).save_pretrained(directory)
    return directory


def _t5(tokenizer, width: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=4, pad_token_id=0, eos_token_id=1))


def _unet(latent_side: int, block_out_channels: tuple[int, ...], cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    down = ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32, **extra,
    )


def _vae(latent_side: int, shift_factor: float | None = None) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=2 * latent_side, shift_factor=shift_factor,
    )


def _text_encoder(kind, tokenizer, width: int):
    return kind(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
