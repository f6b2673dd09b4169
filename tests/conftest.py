"""Tiny, seeded, random diffusers components (STYLE rule 9), saved in diffusers format once per session."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from fnf.worlds.tokenizer import build_clip_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "top", "bottom", "left", "right", "and"]


def tiny_pipeline(directory, tokenizer_dir) -> StableDiffusionPipeline:
    """SD1.x-shaped: 16×16 RGB images, VAE factor 2, 8×8×4 latents, 2-layer 32-wide CLIP text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16,
    )
    tokenizer = build_clip_tokenizer(WORDS, tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline(root / "model", root / "tokenizer")
    return str(root / "model")
