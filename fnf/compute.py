"""How the frozen model is stored and run: weights in the compute dtype, memory layout, compilation.

Speed levers only: the objective, the LoRA and what it learns do not change. Applied once the trainer is known
(``FocusNFix.setup``), because "auto" follows ``trainer.precision`` and compilation depends on the strategy.
Under ``bf16-mixed``, float32 frozen weights would be re-cast to bfloat16 by autocast on every UNet call (autocast
caches casts only of weights that require grad), and peft would cast every LoRA input to float32 for autocast to
cast back: storing the frozen weights in bfloat16 and switching off peft's input cast removes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from diffusers.models.attention import JointTransformerBlock
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from peft.tuners.tuners_utils import BaseTunerLayer
from typing_extensions import override

from fnf.pipeline import Text2ImageModel

FrozenDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ComputeArgs:
    """Speed levers for the frozen model; LoRA weights, gradients and optimizer state stay float32."""

    frozen_dtype: FrozenDtype = "auto"
    """Storage dtype of the frozen UNet, VAE and text-encoder weights. auto: the trainer precision's compute dtype
    (bf16-mixed -> bfloat16, 16-mixed -> float16, otherwise float32); a low-precision dtype needs that precision."""
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    """channels_last: UNet and VAE convolutions in NHWC (faster with GPU tensor cores; usually slower on CPUs)."""
    compile: Literal["none", "unet", "unet+graphs"] = "none"
    """unet: torch.compile the UNet's repeated transformer blocks (diffusers' regional compilation: short compile
    time, fixed shapes), paid during the first steps; unet+graphs: the same with CUDA graphs (CUDA only)."""


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a Lightning precision computes in: 'bf16-mixed' -> bfloat16, '16-mixed' -> float16, else float32."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0], torch.float32)


def frozen_dtype(args: ComputeArgs, precision: str) -> torch.dtype:
    """The frozen weights' dtype under ``precision``; settings that cannot train are refused (checked by the CLI
    before the model loads, and again in setup)."""
    compute = compute_dtype(precision)
    if str(precision).endswith("-true") and compute != torch.float32:  # everything, the LoRA too, in half precision
        mixed = f"{str(precision).split('-')[0]}-mixed"
        raise ValueError(f"trainer.precision={precision}: LoRA weights, their gradients and optimizer state stay "
                         f"float32 in fnf; use {mixed} (the frozen weights are then stored in {str(compute)[6:]})")
    if args.frozen_dtype == "auto":
        return compute
    dtype = getattr(torch, args.frozen_dtype)
    if dtype not in (torch.float32, compute):  # without autocast in that dtype, ops would meet mixed dtypes
        raise ValueError(f"model.compute.frozen_dtype={args.frozen_dtype} needs trainer.precision "
                         f"{'bf16' if dtype == torch.bfloat16 else '16'}-mixed, got {precision}; or use auto")
    return dtype


def apply_compute(model: Text2ImageModel, args: ComputeArgs, trainer: L.Trainer) -> None:
    """Cast the frozen weights of ``model`` (not its trainable LoRA), set the memory layout, compile its UNet."""
    unet, dtype = model.denoiser, frozen_dtype(args, trainer.precision)
    float32 = {param for part in model.float32_parts(dtype) for param in part.parameters()}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad and param.is_floating_point() and param not in float32:
                param.data = param.data.to(dtype)
    if dtype != torch.float32:  # autocast casts LoRA inputs itself; peft's cast to float32 would be undone per layer
        for layer in unet.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.cast_input_dtype_enabled = False
    if args.memory_format == "channels_last":
        for child in model.children():
            child.to(memory_format=torch.channels_last)
    if args.compile != "none" and not getattr(unet, "_fnf_compiled", False):
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"model.compute.compile={args.compile} is not supported with FSDP strategies; "
                             "use compile: none")
        device = trainer.strategy.root_device.type
        if args.compile == "unet+graphs" and device != "cuda":
            raise ValueError(f"model.compute.compile=unet+graphs needs a CUDA device, got {device}; use unet")
        # Blocks at several widths, row counts (fused, base-only, tuned) and grad modes: more variants than 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compile_repeated_blocks(unet, args.compile, mode="reduce-overhead" if args.compile == "unet+graphs" else None)
        unet._fnf_compiled = True


def compile_repeated_blocks(denoiser: torch.nn.Module, setting: str, mode: str | None) -> None:
    """diffusers' regional compilation (each repeated block compiled once, reused by all); SD3's transformer names no
    repeated blocks in diffusers, so its MMDiT blocks are named here."""
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(mode=mode)
        return
    blocks = [block for block in denoiser.modules() if isinstance(block, JointTransformerBlock)]
    if not blocks:
        raise ValueError(f"model.compute.compile={setting}: {type(denoiser).__name__} names no repeated blocks to "
                         "compile (diffusers' _repeated_blocks); use compile: none")
    for block in blocks:
        block.compile(mode=mode)


class ComputeLevers(L.LightningModule):
    """A LightningModule whose ``self.model`` (a Text2ImageModel) follows ``self.compute`` (ComputeArgs)."""

    @override
    def setup(self, stage: str) -> None:
        """Levers that follow the trainer (precision, device, strategy): frozen weights' dtype, layout, compilation."""
        apply_compute(self.model, self.compute, self.trainer)
