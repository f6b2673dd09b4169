"""Writes, per rank, how the UNet, text encoder and reward heads are held under FSDP2 (imported by ``fnf fit``
by class_path): parameters that are ``DTensor``s, the numel this rank stores vs the full numel, which checkpoint
writer the strategy uses, and how many of the UNet's transformer / ResNet blocks are sharded units of their own."""

import json
from pathlib import Path

from lightning import Callback
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fnf.sharding import SHARDED_BLOCKS


class WriteShardSizes(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        # FSDP2 can leave its root group (conv_in/out, time embedding: no trainable weights, so no post-backward
        # reshard) unsharded after a gradient-free forward or a state-dict gather, until its next forward;
        # reshard() frees such transient copies, so what is counted is how the weights are stored.
        for module in pl_module.model.denoiser.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        parts = {"unet": pl_module.model.denoiser, "text_encoder": pl_module.model.text_encoder,
                 "heads": pl_module.heads}  # "unet": the denoiser, an SD3 / FLUX transformer too
        sizes = {}
        for name, part in parts.items():
            params, lora = list(part.parameters()), [p for n, p in part.named_parameters() if "lora_" in n]
            sizes[name] = {"params": len(params), "dtensors": sum(isinstance(p, DTensor) for p in params),
                           "lora_dtensors": sum(isinstance(p, DTensor) for p in lora),
                           "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                              for p in params),
                           "numel": sum(p.numel() for p in params)}
        sizes["checkpoint_io"] = type(trainer.strategy.checkpoint_io).__name__
        blocks = [m for m in pl_module.model.denoiser.modules() if isinstance(m, SHARDED_BLOCKS)]  # each its own unit
        sizes["blocks"], sizes["sharded_blocks"] = len(blocks), sum(isinstance(m, FSDPModule) for m in blocks)
        Path(self.folder, f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(sizes))
