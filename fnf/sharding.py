"""FSDP2 for the denoiser: ``fully_shard`` its repeated blocks, then the whole, over a data-parallel mesh.

Used by ``FocusNFix.configure_model`` under Lightning's ``ModelParallelStrategy`` (FSDP2; it runs on CPU with
gloo as well as on GPUs). Each block's frozen weights and LoRA weights are one all-gather unit; every rank
keeps about 1/N of each parameter (a dim-0 chunk), which becomes a ``DTensor``. Only the LoRA weights have
gradients, so only they are reduce-scattered. The text encoders, the VAE and the reward heads are frozen and
stay whole on every rank.
"""

from __future__ import annotations

import lightning as L
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from typing_extensions import override

SHARDED_BLOCKS = (BasicTransformerBlock, ResnetBlock2D, JointTransformerBlock, FluxTransformerBlock,
                  FluxSingleTransformerBlock)
"""Module types sharded as their own unit: the UNets' (the policy of ``benchmarks/sd15_step.py``'s FSDP1 auto-wrap),
SD3's MMDiT blocks and FLUX's double- and single-stream blocks."""


def shard_unet(unet: nn.Module, mesh: DeviceMesh) -> None:
    """Shard ``unet`` in place: each ``SHARDED_BLOCKS`` module, then the rest (conv_in/out, time embedding, ...)."""
    if isinstance(unet, FSDPModule):  # configure_model runs once per fit / validate / test on the same module
        return
    for block in unet.modules():
        if isinstance(block, SHARDED_BLOCKS):
            fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)


class ShardedUnet(L.LightningModule):
    """A LightningModule whose ``self.model`` (a Text2ImageModel) gets its UNet sharded under FSDP2."""

    @override
    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy`` (which sets ``device_mesh``): shard the UNet. Under every other
        strategy there is no mesh and nothing to do."""
        if self.device_mesh is None:
            return
        if self.device_mesh["tensor_parallel"].size() != 1:  # the data shards follow the global rank (fnf.data)
            raise ValueError("trainer.strategy.init_args.tensor_parallel_size must be 1: fnf shards the UNet with "
                             "FSDP2 over data_parallel_size = all processes")
        self.model.shard(self.device_mesh["data_parallel"])
