"""Random-weight, SD1.x-shaped pipelines saved in diffusers format: for tests and benchmarks.

No hub is reachable here, so tests and speed measurements build their own models; they go through
the same loading code (``Text2ImageModel.from_pretrained``) as a downloaded Stable Diffusion.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from fnf.worlds.tokenizer import build_clip_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "top", "bottom", "left", "right", "and"]


def build_random_sd(directory: str | Path, latent_side: int = 8, block_out_channels: tuple[int, ...] = (32, 64),
                    text_width: int = 32, seed: int = 0) -> Path:
    """Save a random SD1.x-layout pipeline: VAE factor 2, images of side 2·latent_side."""
    directory = Path(directory)
    torch.manual_seed(seed)
    down = ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_side, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=2 * latent_side,
    )
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)
    return directory
