"""FLUX.1 (dev, schnell): a double/single-stream flow transformer on packed 2×2 latent patches, as FluxPipeline runs it.

The conditioning is T5 tokens plus CLIP-L's pooled output; dev takes its guidance scale as an input of the
transformer (guidance distillation: no unconditional pass), schnell takes none. Latents stay (B, C, h, w) in the
sampler, so the Euler update and DRaFT-LV are layout-free; ``predict`` packs them into FLUX's (B, h/2·w/2, 4C)
tokens with their position ids and unpacks the velocity. Sigmas: ``linspace(1, 1/N, N)`` shifted by the
resolution-dependent μ, as FluxPipeline sets them.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor, nn
from transformers import CLIPTextModel, T5EncoderModel

from fnf.device_copies import to_device
from fnf.model_files import load_part, load_tokenizer
from fnf.pipeline import Text2ImageModel, TextEmbedding, token_ids

T5_TOKENS = {"embedded": 512, "none": 256}
"""T5 tokens per prompt by guidance kind: FLUX.1 [dev] was trained with 512 (FluxPipeline's default
``max_sequence_length``), [schnell] with 256 (Black Forest Labs' reference code; diffusers' documentation passes
``max_sequence_length=256`` for it). FLUX attends to the padding too, so the count changes images. Fewer where the
tokenizer's limit is lower."""
DEFAULT_SAMPLE_SIZE = 128
"""FluxPipeline's default latent side (1024 px with the 8× VAE); the transformer config does not store one."""


class FluxModel(Text2ImageModel):
    """A frozen FLUX.1-layout model (``transformer/`` FluxTransformer2DModel, CLIP-L ``text_encoder/``, T5
    ``text_encoder_2/``, ``FlowMatchEulerDiscreteScheduler``)."""

    denoiser_name = "transformer"
    lora_pipeline = FluxPipeline

    def __init__(self, transformer: FluxTransformer2DModel, text_encoder: nn.Module, tokenizer,
                 scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL, text_encoder_2: nn.Module,
                 tokenizer_2) -> None:
        super().__init__(transformer, text_encoder, tokenizer, scheduler, vae)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2.requires_grad_(False).eval(), tokenizer_2
        self.t5_tokens = min(T5_TOKENS[self.guidance], tokenizer_2.model_max_length)
        self._ids: dict[tuple, tuple[Tensor, Tensor]] = {}  # position ids per (shape, device): not rebuilt per call

    @classmethod
    def load(cls, path: str, index: dict) -> FluxModel:
        """Load the parts of a local FLUX.1 folder (``index`` = its model_index.json)."""
        return cls(
            load_part(path, "transformer", FluxTransformer2DModel), load_part(path, "text_encoder", CLIPTextModel),
            load_tokenizer(path, "tokenizer", index),
            load_part(path, "scheduler", FlowMatchEulerDiscreteScheduler, weights=False),
            load_part(path, "vae", AutoencoderKL), load_part(path, "text_encoder_2", T5EncoderModel),
            load_tokenizer(path, "tokenizer_2", index),
        )

    @property
    def guidance(self) -> str:
        """dev: the guidance scale is a transformer input; schnell: no guidance at all."""
        return "embedded" if self.transformer.config.guidance_embeds else "none"

    @property
    def resolution(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    @property
    def latent_multiple(self) -> int:
        return 2  # 2×2 patches are packed into one token

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        channels, side, _ = super().latent_shape(resolution)
        return (channels // 4, side, side)  # in_channels counts a packed 2×2 patch

    def encode_prompts(self, prompts: list[str]) -> TextEmbedding:
        ids = to_device(token_ids(self.tokenizer, prompts), self.text_encoder.device)
        pooled = self.text_encoder(ids).pooler_output
        hidden = self.text_encoder_2(to_device(token_ids(self.tokenizer_2, prompts, self.t5_tokens), pooled.device))[0]
        return TextEmbedding(hidden.to(pooled.dtype), pooled=pooled)

    def predict(self, latents: Tensor, t: Tensor, text: TextEmbedding, guidance: float | None = None) -> Tensor:
        batch, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids, text_ids = self._position_ids(height, width, text.hidden.shape[1], latents)
        embedded = None if guidance is None else torch.full((batch,), guidance, device=latents.device)
        velocity = self.transformer(hidden_states=packed, timestep=t.expand(batch) / 1000, guidance=embedded,
                                    pooled_projections=text.pooled, encoder_hidden_states=text.hidden,
                                    txt_ids=text_ids, img_ids=image_ids).sample
        pixels = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        return FluxPipeline._unpack_latents(velocity, *pixels, self.vae_scale_factor)

    def _position_ids(self, height: int, width: int, text_tokens: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (height, width, text_tokens, like.device, like.dtype)
        if key not in self._ids:
            image = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, like.device, like.dtype)
            self._ids[key] = (image, torch.zeros(text_tokens, 3, device=like.device, dtype=like.dtype))
        return self._ids[key]

    def flow_schedule(self, num_steps: int, latent_shape: tuple[int, int, int]) -> dict:
        """``set_timesteps`` arguments as FluxPipeline passes them."""
        config = self.scheduler.config
        image_tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)
        mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        return {"sigmas": sigmas, "mu": mu}
