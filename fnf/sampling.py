"""Differentiable DDIM sampling (eta = 0) with classifier-free guidance: DRaFT, DRaFT-K, DRaFT-LV.

Deterministic DDIM matters for Focus-N-Fix: with the same prompt and the same x_T, the base and the
tuned pass differ only by the LoRA's effect, so ``I - I0`` measures exactly what fine-tuning changed.
Each step calls diffusers' ``DDIMScheduler.step``; this file only decides where gradients flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fnf.pipeline import Text2ImageModel, TextEmbedding

GradMode = Literal["none", "full", "last_k", "lv"]


@dataclass
class SamplerArgs:
    """How images are sampled and which sampling steps carry gradients (Clark et al., DRaFT, 2024)."""

    num_steps: int = 50
    """DDIM steps (eta = 0)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; 1 disables the unconditional pass."""
    grad_mode: GradMode = "last_k"
    """Gradient path in training: full (DRaFT), last_k (DRaFT-K), lv (DRaFT-LV), none."""
    k: int = 2
    """DRaFT-K: number of final steps that carry gradients (paper: K = 2)."""
    lv_samples: int = 2
    """DRaFT-LV: re-noised samples n per prompt (each one differentiable final step)."""
    unet_input: Literal["pass_grad", "stop_grad"] = "pass_grad"
    """stop_grad: gradients skip the UNet's input x_t and flow only through the DDIM update, as DRaFT allows."""
    checkpointing: Literal["per_step", "off"] = "per_step"
    """per_step: recompute each differentiable step (and the decode) in backward to save memory."""
    resolution: int | None = None
    """Image side in pixels; None uses the model's native resolution."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"model.sampler.num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.k <= self.num_steps:
            raise ValueError(f"model.sampler.k must be in [1, num_steps={self.num_steps}], got {self.k}")
        if self.lv_samples < 1:
            raise ValueError(f"model.sampler.lv_samples must be >= 1, got {self.lv_samples}")
        if self.guidance_scale < 1:
            raise ValueError(f"model.sampler.guidance_scale must be >= 1, got {self.guidance_scale}")


@dataclass
class Sample:
    latents: Tensor
    """(N, C, h, w) final latents x_0."""
    images: Tensor
    """(N, 3, H, W) decoded RGB in [0, 1]."""


def initial_noise(seeds: Tensor, shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """x_T from one CPU generator per (prompt, seed): the same noise whatever the batch composition."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(noise).to(device)  # (B, C, h, w)


class DDIMSampler:
    """Runs the denoising chain of ``model`` (with whatever adapter state it currently has)."""

    def __init__(self, model: Text2ImageModel, args: SamplerArgs) -> None:
        self.model, self.args = model, args
        self.scheduler = model.scheduler
        self.scheduler.set_timesteps(args.num_steps)

    @property
    def resolution(self) -> int:
        return self.args.resolution or self.model.resolution

    def samples_per_prompt(self, grad_mode: GradMode) -> int:
        """DRaFT-LV returns n samples per prompt, stacked as (n·B, ...); every other mode returns B."""
        return self.args.lv_samples if grad_mode == "lv" else 1

    def __call__(self, noise: Tensor, text: TextEmbedding, uncond: TextEmbedding, grad_mode: GradMode) -> Sample:
        """noise x_T (B, C, h, w), prompt and unconditional conditioning (B rows each) -> Sample."""
        timesteps = self.scheduler.timesteps
        n_grad = {"none": 0, "lv": 0, "full": len(timesteps), "last_k": self.args.k}[grad_mode]
        condition = self._guided(text, uncond)  # built once, used by every UNet call
        latents = noise
        with torch.no_grad():
            for t in timesteps[: len(timesteps) - n_grad]:
                latents = self._step(latents, t, condition)
        for t in timesteps[len(timesteps) - n_grad:]:
            latents = self._maybe_checkpoint(self._step, latents, t, condition)
        if grad_mode == "lv":
            latents = self._lower_variance_step(latents.detach(), timesteps[-1], text, uncond)
        if grad_mode == "none":
            with torch.no_grad():
                return Sample(latents, self.model.decode(latents))
        return Sample(latents, self._maybe_checkpoint(self.model.decode, latents))

    def _guided(self, text: TextEmbedding, uncond: TextEmbedding) -> TextEmbedding:
        """The UNet's conditioning: [unconditional; prompt] rows for classifier-free guidance, else the prompt."""
        return TextEmbedding.cat([uncond, text]) if self.args.guidance_scale > 1 else text

    def _lower_variance_step(self, x0: Tensor, t: Tensor, text: TextEmbedding, uncond: TextEmbedding) -> Tensor:
        """DRaFT-LV: re-noise x_0 to the last timestep n times and take one differentiable step each."""
        n = self.args.lv_samples
        x0 = x0.repeat(n, 1, 1, 1)  # (n·B, C, h, w), sample i of prompt b at i·B + b
        noisy = self.scheduler.add_noise(x0, torch.randn_like(x0), t.reshape(1))
        return self._maybe_checkpoint(self._step, noisy, t, self._guided(text.repeat(n), uncond.repeat(n)))

    def _step(self, latents: Tensor, t: Tensor, condition: TextEmbedding) -> Tensor:
        """One DDIM (eta = 0) update x_t -> x_{t-1}, classifier-free guided when ``condition`` has both halves."""
        unet_in = latents.detach() if self.args.unet_input == "stop_grad" else latents
        if self.args.guidance_scale > 1:
            eps_uncond, eps_text = self.model.predict_noise(torch.cat([unet_in, unet_in]), t, condition).chunk(2)
            eps = eps_uncond + self.args.guidance_scale * (eps_text - eps_uncond)
        else:
            eps = self.model.predict_noise(unet_in, t, condition)
        return self.scheduler.step(eps, t, latents, eta=0.0).prev_sample

    def _maybe_checkpoint(self, fn, *args):
        if self.args.checkpointing == "per_step" and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)
