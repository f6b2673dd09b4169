"""Random-weight pipelines shaped like Stable Diffusion 3.5 Medium and FLUX.1 [dev], for ``benchmarks/sd15_step.py``.

No hub here: the published configurations are written out below (checked against the models' diffusers
``config.json`` files) and the weights are random; compute and memory do not depend on their values.

- SD3.5 Medium: the MMDiT-X transformer (24 layers, the first 13 with a second, image-only attention; 2.2 B
  parameters), the 16-channel VAE, CLIP-L and CLIP-bigG with projections, **no T5**: without ``text_encoder_3``
  diffusers (and ``fnf.sd3``) feed 256 zero tokens of width 4096 in its place, so the transformer computes
  exactly what it computes with T5; a random T5-XXL would add 4.7 B parameters (19 GB in float32, minutes to
  build) for one text encoding per step.
- FLUX.1 [dev]: the transformer at its published widths (24 heads × 128, T5 width 4096, CLIP-L pooled 768,
  guidance embedding, RoPE axes 16/56/56) with **fewer blocks** than the real 19 double- and 38 single-stream
  ones (a full 12 B random model is 24 GB in bf16 and minutes to build and save, on a 64 GB disk); CLIP-L
  and a T5 encoder with T5-XXL's widths (d_model 4096, 64 heads, gated-GELU 10 240) but 2 layers, so the
  transformer sees the same 512 tokens × 4096. ``sd15_step.py`` estimates the full model's step from the
  measured cost per block.

The random weights are initialised on ``device`` (a GPU does it in seconds) and saved in bfloat16, which
halves the files and the time to write and read them; fnf casts frozen weights to the run's dtype itself
(``model.compute.frozen_dtype``: float32 for the ``before`` variant, bfloat16 under bf16-mixed otherwise).
The tokenizers are the shapes world's word-level ones (same compute: the sequence lengths are the models').
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from fnf.worlds.random_sd import WORDS, build_random_flux, build_random_sd3
from fnf.worlds.tokenizer import build_clip_tokenizer, build_t5_like_tokenizer

SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_BLOCKS = (19, 38)
"""FLUX.1 [dev]'s double- and single-stream block counts."""
VAE_16 = dict(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              use_quant_conv=False, use_post_quant_conv=False)
SD3_VAE = VAE_16 | dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = VAE_16 | dict(scaling_factor=0.3611, shift_factor=0.1159)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")
T5_XXL_WIDTHS = dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, feed_forward_proj="gated-gelu")
FLUX_T5_LAYERS = 2
"""T5-XXL has 24; the transformer only sees the output tokens, whose shape does not depend on the depth."""


def build_sd35_medium(directory: Path, small: bool, device: str = "cpu") -> Path:
    """Save an SD3.5-Medium-shaped pipeline without T5 (or a tiny SD3 one, also without T5), random weights."""
    if small:
        return build_random_sd3(directory, t5=False)
    with torch.device(device):
        return save_bf16(sd35_medium(directory), directory)


def sd35_medium(directory: Path) -> StableDiffusion3Pipeline:
    """The SD3.5-Medium-shaped pipeline (tokenizers written to ``directory``), on the current default device."""
    torch.manual_seed(0)
    tokenizers = [build_clip_tokenizer(WORDS, directory / name) for name in ("tokenizer", "tokenizer_2")]
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER), vae=AutoencoderKL(**SD3_VAE),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(CLIPTextModelWithProjection, tokenizers[0], CLIP_L), tokenizer=tokenizers[0],
        text_encoder_2=_clip(CLIPTextModelWithProjection, tokenizers[1], CLIP_BIG_G), tokenizer_2=tokenizers[1],
        text_encoder_3=None, tokenizer_3=None,
    )


def build_flux_dev(directory: Path, small: bool, blocks: tuple[int, int], device: str = "cpu") -> Path:
    """Save a FLUX.1-dev-shaped pipeline with ``blocks`` = (double, single) transformer blocks (or a tiny FLUX one
    with that many blocks), random weights."""
    if small:
        build_random_flux(directory)
        tiny = FluxTransformer2DModel.load_config(directory / "transformer")
        FluxTransformer2DModel.from_config(tiny, num_layers=blocks[0], num_single_layers=blocks[1]).save_pretrained(
            directory / "transformer")
        return directory
    with torch.device(device):
        return save_bf16(flux_dev(directory, blocks), directory)


def flux_dev(directory: Path, blocks: tuple[int, int]) -> FluxPipeline:
    """The FLUX.1-dev-shaped pipeline with ``blocks`` = (double, single) blocks, on the current default device."""
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(WORDS, directory / "tokenizer")
    tokenizer_2 = build_t5_like_tokenizer(WORDS, directory / "tokenizer_2", model_max_length=512)
    t5 = T5Config(vocab_size=len(tokenizer_2), num_layers=FLUX_T5_LAYERS, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0, **T5_XXL_WIDTHS)
    return FluxPipeline(
        transformer=FluxTransformer2DModel(num_layers=blocks[0], num_single_layers=blocks[1], **FLUX_DEV_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=AutoencoderKL(**FLUX_VAE), text_encoder=_clip(CLIPTextModel, tokenizer, CLIP_L), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
    )


def parameter_counts(pipeline) -> str:
    """'transformer 2.24 B, vae 0.08 B, ...': the size of each weighted component."""
    sizes = {name: sum(p.numel() for p in part.parameters()) for name, part in pipeline.components.items()
             if isinstance(part, torch.nn.Module)}
    return ", ".join(f"{name} {size / 1e9:.2f} B" for name, size in sizes.items())


def save_bf16(pipeline, directory: Path) -> Path:
    print(f"# parameters: {parameter_counts(pipeline)}; saved in bfloat16", flush=True)
    pipeline.to("cpu", torch.bfloat16).save_pretrained(directory)
    return directory


def _clip(kind, tokenizer, widths: dict):
    return kind(CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **widths))
