"""Differentiable deterministic sampling with guidance: DRaFT, DRaFT-K, DRaFT-LV.

Determinism matters for Focus-N-Fix: with the same prompt and the same x_T, the base and the tuned pass differ
only by the LoRA's effect, so ``I - I0`` measures exactly what fine-tuning changed. Two update rules share one
chain (``Sampler``): DDIM with eta = 0 (``DDIMSampler``, UNet models: diffusers' ``DDIMScheduler.step``) and the
flow-matching Euler ODE (``FlowMatchSampler``, SD3 / FLUX: the scheduler's own sigmas and shift). The chain
decides where gradients flow; the subclasses only say how one step moves x_t.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fnf.device_copies import to_device
from fnf.lora_passes import FoldedLora
from fnf.pipeline import Text2ImageModel, TextEmbedding

GradMode = Literal["none", "full", "last_k", "lv"]


@dataclass
class SamplerArgs:
    """How images are sampled and which sampling steps carry gradients (Clark et al., DRaFT, 2024)."""

    num_steps: int = 50
    """Sampling steps (DDIM with eta = 0, or flow-matching Euler)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale (1 disables the unconditional pass); FLUX.1-dev: its embedded guidance;
    FLUX.1-schnell takes none (1)."""
    grad_mode: GradMode = "last_k"
    """Gradient path in training: full (DRaFT), last_k (DRaFT-K), lv (DRaFT-LV), none."""
    k: int = 2
    """DRaFT-K: number of final steps that carry gradients (paper: K = 2)."""
    lv_samples: int = 2
    """DRaFT-LV: re-noised samples n per prompt (each one differentiable final step)."""
    unet_input: Literal["pass_grad", "stop_grad"] = "pass_grad"
    """stop_grad: gradients skip the denoiser's input x_t and flow only through the update, as DRaFT allows."""
    checkpointing: Literal["per_step", "off"] = "per_step"
    """per_step: recompute each differentiable step (and the decode) in backward to save memory."""
    resolution: int | None = None
    """Image side in pixels; None uses the model's native resolution."""
    fused_base: bool = True
    """Sample I0 and I together: one denoiser call per gradient-free step both take, base rows in the first half of
    the batch, tuned rows in the second (exact up to float rounding); false: two separate passes."""
    fold_lora: bool = True
    """Gradient-free steps run each LoRA Linear as one matmul with W + s·B·A, folded once per pass (exact up to
    float rounding); false: peft's LoRA layers in every call."""
    fold_lora_grad: bool = True
    """Differentiable steps run each LoRA Linear as one matmul too: W + s·B·A built once per chain with gradients
    to the LoRA (exact up to float rounding; holds one copy of the LoRA-targeted weights while the step's graph
    lives); false: peft's LoRA layers, forward and backward."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"model.sampler.num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.k <= self.num_steps:
            raise ValueError(f"model.sampler.k must be in [1, num_steps={self.num_steps}], got {self.k}")
        if self.lv_samples < 1:
            raise ValueError(f"model.sampler.lv_samples must be >= 1, got {self.lv_samples}")
        if not 1 <= self.guidance_scale < float("inf"):
            raise ValueError(f"model.sampler.guidance_scale must be a finite number >= 1, got {self.guidance_scale}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"model.sampler.resolution must be a positive number of pixels or null (the model's "
                             f"native size), got {self.resolution}")


@dataclass
class Sample:
    latents: Tensor
    """(N, C, h, w) final latents x_0."""
    images: Tensor
    """(N, 3, H, W) decoded RGB in [0, 1]."""


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """x_T from one CPU generator per (prompt, seed): the same noise whatever the batch composition."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return to_device(torch.stack(noise), device)  # (B, C, h, w)


def make_sampler(model: Text2ImageModel, args: SamplerArgs) -> Sampler:
    """The sampler the model's scheduler family calls for: flow-matching Euler or DDIM."""
    if isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchSampler(model, args)
    return DDIMSampler(model, args)


class Sampler(ABC):
    """Runs the denoising chain of ``model`` (with whatever adapter state it currently has).

    Subclasses set ``self.timesteps`` (the denoiser's t per step, on the CPU) and define one step's update
    (``_update``) and DRaFT-LV's re-noising (``_renoise``)."""

    timesteps: Tensor

    def __init__(self, model: Text2ImageModel, args: SamplerArgs) -> None:
        self.model, self.args = model, args
        self.classifier_free = args.guidance_scale > 1 and model.guidance == "cfg"
        self.embedded_guidance = args.guidance_scale if model.guidance == "embedded" else None
        if model.guidance == "none" and args.guidance_scale != 1:
            raise ValueError(f"model.sampler.guidance_scale={args.guidance_scale}: this model takes no guidance "
                             "(a guidance-distilled model without a guidance input, e.g. FLUX.1-schnell); set 1")
        self._unet_timesteps: dict[torch.device, Tensor] = {}  # the denoiser's t, copied to its device once

    @abstractmethod
    def _update(self, output: Tensor, i: int, latents: Tensor) -> Tensor:
        """x_{t_i} -> x_{t_{i+1}} given the denoiser's (guided) output at step i."""

    @abstractmethod
    def _renoise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """x_0 noised to step i's noise level (DRaFT-LV)."""

    @property
    def resolution(self) -> int:
        return self.args.resolution or self.model.resolution

    def samples_per_prompt(self, grad_mode: GradMode) -> int:
        """DRaFT-LV returns n samples per prompt, stacked as (n·B, ...); every other mode returns B."""
        return self.args.lv_samples if grad_mode == "lv" else 1

    def __call__(self, noise: Tensor, text: TextEmbedding, uncond: TextEmbedding, grad_mode: GradMode) -> Sample:
        """noise x_T (B, C, h, w), prompt and unconditional conditioning (B rows each) -> Sample."""
        start = self._no_grad_steps(grad_mode)
        with self.model.gradient_free_lora(pair=False, fold=self.args.fold_lora):
            latents = self._denoise(noise, self._guided(text, uncond), 0, start)
        return self._finish(latents, start, text, uncond, grad_mode)

    def with_base(self, noise: Tensor, text: TextEmbedding, uncond: TextEmbedding,
                  grad_mode: GradMode) -> tuple[Sample, Sample]:
        """(I0, I) from the same x_T: the base model θ0 (LoRA off, no grad) and the tuned model θ (``grad_mode``).

        With ``fused_base``, the steps both chains take without gradients are one UNet call per step, the base
        chain on the first half of the batch and the tuned chain on the second; each chain then finishes alone.
        """
        start = self._no_grad_steps(grad_mode)
        if not self.args.fused_base or start == 0:  # DRaFT (full) has no gradient-free steps to share
            with self.model.adapter_disabled():
                base = self(noise, text, uncond, "none")
            return base, self(noise, text, uncond, grad_mode)
        condition = self._guided(text, uncond)
        with self.model.gradient_free_lora(pair=True, fold=self.args.fold_lora):
            both = self._denoise(torch.cat([noise, noise]), TextEmbedding.cat([condition, condition]), 0, start, 2)
        base_latents, tuned_latents = both.chunk(2)
        with self.model.adapter_disabled():
            base = self._finish(base_latents, start, text, uncond, "none")
        return base, self._finish(tuned_latents, start, text, uncond, grad_mode)

    def _no_grad_steps(self, grad_mode: GradMode) -> int:
        """How many leading steps run without gradients: all but the last K (DRaFT-K), none (DRaFT), all."""
        steps = len(self.timesteps)
        return steps - {"none": 0, "lv": 0, "full": steps, "last_k": self.args.k}[grad_mode]

    def _denoise(self, latents: Tensor, condition: TextEmbedding, start: int, stop: int, chains: int = 1) -> Tensor:
        """Steps ``start:stop`` without gradients; ``chains`` independent chains stacked in ``latents``.

        The steps run in the model's ``gradient_free_mode`` (inference mode where it can); the result leaves as a
        normal tensor, as the tuned chain's differentiable steps continue from it."""
        if start == stop:  # DRaFT (full): no gradient-free step; x_T keeps its autograd history
            return latents
        with self.model.gradient_free_mode():
            for i in range(start, stop):
                latents = self._step(latents, i, condition, chains)
        return latents.clone()

    def _finish(self, latents: Tensor, start: int, text: TextEmbedding, uncond: TextEmbedding,
                grad_mode: GradMode) -> Sample:
        """Steps ``start:`` (differentiable unless ``grad_mode`` is none), DRaFT-LV's extra step, then decode."""
        grad = torch.is_grad_enabled() and grad_mode != "none"
        fold = (self.args.fold_lora_grad if grad else self.args.fold_lora) and start < len(self.timesteps)
        with torch.set_grad_enabled(grad):
            folded = self.model.folded_lora(fold)
            with folded.installed():
                condition = self._guided(text, uncond)
                for i in range(start, len(self.timesteps)):
                    latents = self._maybe_checkpoint(self._step, latents, i, condition, recompute_in=folded)
                if grad_mode == "lv":
                    latents = self._lower_variance_step(latents.detach(), text, uncond, folded)
                return Sample(latents, self._maybe_checkpoint(self.model.decode, latents))

    def _guided(self, text: TextEmbedding, uncond: TextEmbedding) -> TextEmbedding:
        """The denoiser's conditioning: [unconditional; prompt] rows for classifier-free guidance, else the prompt."""
        return TextEmbedding.cat([uncond, text]) if self.classifier_free else text

    def _lower_variance_step(self, x0: Tensor, text: TextEmbedding, uncond: TextEmbedding,
                             folded: FoldedLora) -> Tensor:
        """DRaFT-LV: re-noise x_0 to the last timestep n times and take one differentiable step each."""
        n, last = self.args.lv_samples, len(self.timesteps) - 1
        x0 = x0.repeat(n, 1, 1, 1)  # (n·B, C, h, w), sample i of prompt b at i·B + b
        noisy = self._renoise(x0, torch.randn_like(x0), last)
        condition = self._guided(text.repeat(n), uncond.repeat(n))
        return self._maybe_checkpoint(self._step, noisy, last, condition, recompute_in=folded)

    def _step(self, latents: Tensor, i: int, condition: TextEmbedding, chains: int = 1) -> Tensor:
        """Step i, classifier-free guided when ``condition`` has both halves.

        ``latents`` stacks ``chains`` chains of B rows; with guidance each chain's rows go to the denoiser twice, as
        [unconditional; prompt], chain after chain. The denoiser gets t as a tensor on its device; the scheduler
        keeps its CPU copy (its arithmetic on t is host work), so no step waits on the device."""
        t = self._timesteps_on(latents.device)[i]
        model_in = latents.detach() if self.args.unet_input == "stop_grad" else latents
        if self.classifier_free:
            pairs = model_in.unflatten(0, (chains, 1, -1))  # (chains, 1, B, C, h, w)
            pairs = pairs.expand(-1, 2, *pairs.shape[2:]).flatten(0, 2)  # (chains·2·B, C, h, w)
            out = self.model.predict(pairs, t, condition).unflatten(0, (chains, 2, -1))
            out_uncond, out_text = out.unbind(1)  # (chains, B, C, h, w) each
            out = (out_uncond + self.args.guidance_scale * (out_text - out_uncond)).flatten(0, 1)
        else:
            out = self.model.predict(model_in, t, condition, self.embedded_guidance)
        return self._update(out, i, latents)

    def _timesteps_on(self, device: torch.device) -> Tensor:
        if device not in self._unet_timesteps:
            self._unet_timesteps[device] = to_device(self.timesteps, device)
        return self._unet_timesteps[device]

    def _maybe_checkpoint(self, fn, *args, recompute_in: FoldedLora | None = None):
        """``fn(*args)``, recomputed in backward with per-step checkpointing; the recomputation runs with the same
        folded LoRA weights as the forward (``recompute_in``), whose block has ended by then."""
        if self.args.checkpointing == "per_step" and torch.is_grad_enabled():
            recompute = recompute_in.installed if recompute_in is not None else nullcontext
            return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recompute()))
        return fn(*args)


class DDIMSampler(Sampler):
    """DDIM with eta = 0 (UNet models): diffusers' ``DDIMScheduler.step``, ε or v prediction as configured."""

    def __init__(self, model: Text2ImageModel, args: SamplerArgs) -> None:
        super().__init__(model, args)
        # Its own scheduler: set_timesteps on the model's shared one would change every other sampler's steps.
        self.scheduler = DDIMScheduler.from_config(model.scheduler.config)
        self.scheduler.set_timesteps(args.num_steps)
        self.timesteps = self.scheduler.timesteps
        self.alphas_cumprod = self.scheduler.alphas_cumprod[self.timesteps].tolist()  # ᾱ_t as Python floats

    def _update(self, output: Tensor, i: int, latents: Tensor) -> Tensor:
        return self.scheduler.step(output, self.timesteps[i], latents, eta=0.0).prev_sample

    def _renoise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """``DDIMScheduler.add_noise`` (√ᾱ_t·x_0 + √(1 − ᾱ_t)·ε) with ᾱ_t a Python float: add_noise copies its
        timestep and ᾱ table to the device, a copy the host waits for."""
        alpha = self.alphas_cumprod[i]
        return alpha ** 0.5 * x0 + (1 - alpha) ** 0.5 * noise


class FlowMatchSampler(Sampler):
    """The rectified-flow ODE x_σ = (1 − σ)·x_0 + σ·ε solved with Euler steps (SD3, FLUX.1).

    The sigmas come from the model's ``FlowMatchEulerDiscreteScheduler`` exactly as its diffusers pipeline sets
    them (shift, resolution-dependent shift); the step is the scheduler's deterministic Euler update
    x_{σ'} = x_σ + (σ' − σ)·v, written here because the scheduler's ``step`` counts calls (a step index it
    advances), which per-step checkpointing, DRaFT-LV and the fused base pass would replay out of order."""

    def __init__(self, model: Text2ImageModel, args: SamplerArgs) -> None:
        super().__init__(model, args)
        if model.scheduler.config.get("stochastic_sampling"):  # a deterministic chain is what FNF compares I with I0 on
            raise ValueError("model.pretrained: the scheduler samples stochastically (stochastic_sampling: true); "
                             "Focus-N-Fix needs the deterministic Euler ODE: set it false in scheduler_config.json")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
        latent_shape = model.latent_shape(args.resolution or model.resolution)
        self.scheduler.set_timesteps(args.num_steps, **model.flow_schedule(args.num_steps, latent_shape))
        self.timesteps = self.scheduler.timesteps  # σ·1000, what SD3 / FLUX transformers are given
        self.sigmas = self.scheduler.sigmas.tolist()  # N + 1 values ending at 0, Python floats: no device work

    def _update(self, output: Tensor, i: int, latents: Tensor) -> Tensor:
        return latents + (self.sigmas[i + 1] - self.sigmas[i]) * output

    def _renoise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        return (1 - self.sigmas[i]) * x0 + self.sigmas[i] * noise
