"""Random-weight pipelines shaped like Stable Diffusion 1.5 and SDXL (or tiny ones with the same layout), for
``benchmarks/sd15_step.py`` and ``benchmarks/dispatch.py``.

No hub here: the published UNet / VAE / CLIP configurations are written out below and the weights are random
(seeded); compute and memory do not depend on their values. The tokenizers are the shapes world's word-level
ones (same compute: the sequence lengths are the models'). SDXL's weights are initialised on ``device`` and
saved in bfloat16 (``flow_shaped.save_bf16``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fnf.worlds.random_sd import WORDS, build_random_sdxl
from fnf.worlds.tokenizer import build_clip_tokenizer
from flow_shaped import save_bf16

SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMALL_UNET = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                  attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SMALL_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu")

def build_sdxl(directory: Path, small: bool, device: str = "cpu") -> Path:
    """Save an SDXL-shaped pipeline (2.6 B UNet, CLIP-L + bigG text encoders, 1024²) or a tiny one, random weights
    (initialised on ``device``, saved in bf16)."""
    if small:
        return build_random_sdxl(directory)
    with torch.device(device):
        return save_bf16(sdxl(directory), directory)


def sdxl(directory: Path) -> StableDiffusionXLPipeline:
    """The SDXL-shaped pipeline (tokenizers written to ``directory``), on the current default device."""
    torch.manual_seed(0)
    tokenizers = [build_clip_tokenizer(WORDS, directory / name) for name in ("tokenizer", "tokenizer_2")]
    configs = [CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **text)
               for tokenizer, text in zip(tokenizers, (SD15_TEXT, SDXL_TEXT_2))]
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET),
        vae=AutoencoderKL(latent_channels=4, **(SD15_VAE | dict(sample_size=1024))),
        text_encoder=CLIPTextModel(configs[0]), text_encoder_2=CLIPTextModelWithProjection(configs[1]),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )


def build_model(directory: Path, small: bool) -> Path:
    """Save an SD1.5-shaped pipeline (or a tiny one) with random weights in diffusers format."""
    return build_sd(directory, *((SMALL_UNET, SMALL_VAE, SMALL_TEXT) if small else (SD15_UNET, SD15_VAE, SD15_TEXT)))


def build_sd(directory: Path, unet: dict, vae: dict, text: dict) -> Path:
    """Save an SD1.x-layout pipeline with these UNet / VAE / CLIP-text configurations and random (seeded) weights."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **text)
    StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(latent_channels=4, **vae),
        text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory
