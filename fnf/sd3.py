"""Stable Diffusion 3 / 3.5: an MMDiT transformer on flow matching, conditioned as StableDiffusion3Pipeline does.

The token conditioning is both CLIP encoders' penultimate hidden states, concatenated and zero-padded to the T5
width, followed by the T5 tokens (zeros when the folder has no ``text_encoder_3``, as diffusers allows); the pooled
embedding is both CLIP projections, concatenated. The unconditional branch is the empty prompt, encoded the same
way. Sampling is the flow-matching Euler ODE (``fnf.sampling.FlowMatchSampler``); LoRA, FNF step and export are
shared with every other family through ``Text2ImageModel``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection

from fnf.device_copies import to_device
from fnf.model_files import load_part, load_tokenizer
from fnf.pipeline import Text2ImageModel, TextEmbedding, token_ids

T5_TOKENS = 256
"""T5 tokens per prompt: StableDiffusion3Pipeline's default ``max_sequence_length`` (fewer if the T5 tokenizer's
own limit is lower)."""


class SD3Model(Text2ImageModel):
    """A frozen SD3-layout model (``transformer/``, ``text_encoder{,_2,_3}/``, ``FlowMatchEulerDiscreteScheduler``)."""

    denoiser_name = "transformer"
    lora_pipeline = StableDiffusion3Pipeline

    def __init__(self, transformer: SD3Transformer2DModel, text_encoder: nn.Module, tokenizer,
                 scheduler: FlowMatchEulerDiscreteScheduler, vae: AutoencoderKL, text_encoder_2: nn.Module, tokenizer_2,
                 text_encoder_3: nn.Module | None = None, tokenizer_3=None) -> None:
        super().__init__(transformer, text_encoder, tokenizer, scheduler, vae)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2.requires_grad_(False).eval(), tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        if text_encoder_3 is not None:
            text_encoder_3.requires_grad_(False).eval()
        self.t5_tokens = min(T5_TOKENS, tokenizer_3.model_max_length) if tokenizer_3 is not None else T5_TOKENS

    @classmethod
    def load(cls, path: str, index: dict) -> SD3Model:
        """Load the parts of a local SD3 folder (``index`` = its model_index.json); T5 is optional."""
        t5 = index.get("text_encoder_3") or [None, None]
        if t5[1] and os.path.isdir(path) and not os.path.isdir(os.path.join(path, "text_encoder_3")):
            raise ValueError(f"model.pretrained: {path}: model_index.json lists text_encoder_3 (T5) but the folder "
                             "has none; T5 is optional: set text_encoder_3 and tokenizer_3 to [null, null] in "
                             "model_index.json to run without it")
        return cls(
            load_part(path, "transformer", SD3Transformer2DModel),
            load_part(path, "text_encoder", CLIPTextModelWithProjection),
            load_tokenizer(path, "tokenizer", index),
            load_part(path, "scheduler", FlowMatchEulerDiscreteScheduler, weights=False),
            load_part(path, "vae", AutoencoderKL),
            load_part(path, "text_encoder_2", CLIPTextModelWithProjection),
            load_tokenizer(path, "tokenizer_2", index),
            load_part(path, "text_encoder_3", getattr(transformers, t5[1])) if t5[1] else None,
            load_tokenizer(path, "tokenizer_3", index) if t5[1] else None,
        )

    def encode_prompts(self, prompts: list[str]) -> TextEmbedding:
        clip, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = token_ids(tokenizer, prompts, self.tokenizer.model_max_length)  # the pipeline pads both to CLIP-L's
            output = encoder(to_device(ids, encoder.device), output_hidden_states=True)
            clip.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        width = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = clip[0].new_zeros(len(prompts), self.t5_tokens, width)
        else:
            t5 = self.text_encoder_3(to_device(token_ids(self.tokenizer_3, prompts, self.t5_tokens), clip[0].device))[0]
        clip = torch.cat(clip, dim=-1)
        hidden = torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5.to(clip.dtype)], dim=-2)
        return TextEmbedding(hidden, pooled=torch.cat(pooled, dim=-1))

    def predict(self, latents: Tensor, t: Tensor, text: TextEmbedding, guidance: float | None = None) -> Tensor:
        return self.transformer(hidden_states=latents, timestep=t.expand(len(latents)),
                                encoder_hidden_states=text.hidden, pooled_projections=text.pooled).sample

    def flow_schedule(self, num_steps: int, latent_shape: tuple[int, int, int]) -> dict:
        """``set_timesteps`` arguments as StableDiffusion3Pipeline passes them: the resolution-dependent shift μ
        when the scheduler uses dynamic shifting (SD3.5 variants), else the scheduler's fixed shift."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        patch = self.transformer.config.patch_size
        image_tokens = (latent_shape[1] // patch) * (latent_shape[2] // patch)
        return {"mu": calculate_shift(image_tokens, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.16))}
