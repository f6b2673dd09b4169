"""SDXL: two text encoders and extra UNet conditioning, built exactly as diffusers' StableDiffusionXLPipeline does.

The token conditioning is both encoders' penultimate hidden states, concatenated; the UNet also receives the
pooled projection of the second encoder and "time ids" (original size, crop corner, target size). fnf samples
without crops at the generated size, so the ids are ``(H, W, 0, 0, H, W)``. Everything else (LoRA, sampler,
FNF step) is shared with SD1.x through ``Text2ImageModel``.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from fnf.device_copies import to_device
from fnf.model_files import load_part, load_tokenizer
from fnf.pipeline import Text2ImageModel, TextEmbedding, ddim_scheduler, token_ids


class SDXLModel(Text2ImageModel):
    """A frozen SDXL-layout model (``text_encoder_2/``, ``tokenizer_2/``, ``addition_embed_type: text_time``)."""

    lora_pipeline = StableDiffusionXLPipeline

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module, tokenizer, scheduler: DDIMScheduler,
                 vae: AutoencoderKL, text_encoder_2: nn.Module, tokenizer_2, zero_unconditional: bool = True) -> None:
        super().__init__(unet, text_encoder, tokenizer, scheduler, vae)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2.requires_grad_(False).eval(), tokenizer_2
        self.zero_unconditional = zero_unconditional
        self._time_ids: dict[tuple, Tensor] = {}  # per (size, dtype, device): no host-to-device copy per UNet call

    @classmethod
    def load(cls, path: str, index: dict) -> SDXLModel:
        """Load the parts of a local SDXL folder (``index`` = its model_index.json)."""
        return cls(
            load_part(path, "unet", UNet2DConditionModel), load_part(path, "text_encoder", CLIPTextModel),
            load_tokenizer(path, "tokenizer", index),
            ddim_scheduler(load_part(path, "scheduler", DDIMScheduler, weights=False), path, clip_sample=False),
            load_part(path, "vae", AutoencoderKL),
            load_part(path, "text_encoder_2", CLIPTextModelWithProjection),
            load_tokenizer(path, "tokenizer_2", index),
            zero_unconditional=index.get("force_zeros_for_empty_prompt", True),
        )

    def float32_parts(self, compute: torch.dtype) -> tuple[nn.Module, ...]:
        """SDXL's VAE overflows in float16 (its config's ``force_upcast``; StableDiffusionXLPipeline upcasts it for
        decoding): it stays float32 under 16-mixed. bfloat16 has float32's range: no upcast, as in diffusers."""
        return (self.vae,) if compute == torch.float16 and self._upcast_vae else ()

    @property
    def _upcast_vae(self) -> bool:
        return self.vae is not None and self.vae.config.get("force_upcast", True)

    def decode(self, latents: Tensor) -> Tensor:
        """Under float16 autocast an upcast VAE decodes in float32 (autocast would run its convolutions in float16)."""
        kind = latents.device.type
        if self._upcast_vae and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
            with torch.autocast(kind, enabled=False):
                return super().decode(latents.to(self.vae.dtype))
        return super().decode(latents)

    def encode_prompts(self, prompts: list[str]) -> TextEmbedding:
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            output = encoder(to_device(token_ids(tokenizer, prompts), encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return TextEmbedding(torch.cat(hidden, dim=-1), pooled=output.text_embeds)

    def unconditional(self) -> TextEmbedding:
        """SDXL base was trained with zeroed embeddings for the empty prompt (``force_zeros_for_empty_prompt``)."""
        empty = self.encode_prompts([""])
        if not self.zero_unconditional:
            return empty
        return TextEmbedding(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))

    def predict(self, latents: Tensor, t: Tensor, text: TextEmbedding, guidance: float | None = None) -> Tensor:
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        key = (height, width, text.hidden.dtype, latents.device)
        if key not in self._time_ids:
            self._time_ids[key] = torch.tensor([height, width, 0, 0, height, width], dtype=key[2], device=key[3])
        time_ids = self._time_ids[key]
        conditioning = {"text_embeds": text.pooled, "time_ids": time_ids.expand(len(latents), -1)}
        return self.unet(latents, t, encoder_hidden_states=text.hidden, added_cond_kwargs=conditioning).sample
