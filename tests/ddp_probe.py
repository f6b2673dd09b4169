"""Probes of the 2-process DDP tests (imported by ``fnf fit`` by class_path): a DDP communication hook that counts the
bytes it all-reduces, ranks whose global RNG streams differ, a reward that fails on one rank, and the LoRA weights
after every step."""

from pathlib import Path

import torch
from lightning import Callback
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from fnf.rewards import ColorRegion, RewardOutput
from fnf.rewards.base import heatmap_wanted

REDUCED = [0]


def counting_allreduce(state, bucket):
    REDUCED[0] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(state, bucket)


class WriteReducedBytes(Callback):
    """Counts the gradient bytes DDP all-reduces (Lightning registers comm hooks on CUDA only, so this
    callback registers it) and, at the end of fit, writes the count per rank."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.folder, f"reduced-rank{trainer.global_rank}.txt").write_text(str(REDUCED[0]))




class DivergeRanksRng(Callback):
    """Rank r draws r + 1 numbers from the global CPU generator after the model is built: the ranks' RNG states
    differ, as their CUDA generators do on GPUs (each rank draws DRaFT-LV noise on its own device)."""

    def on_train_start(self, trainer, pl_module) -> None:
        torch.rand(trainer.global_rank + 1)


class NaNAtStep1(ColorRegion):
    """ColorRegion whose score on the tuned images of the second training step (step 1) is NaN: on every process,
    or on process ``rank`` only."""

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self.rank, self.tuned_calls = rank, 0

    def forward(self, images, prompts):
        out = super().forward(images, prompts)
        if not heatmap_wanted():  # the tuned images (the base images' call wants the heatmap)
            self.tuned_calls += 1
            if self.tuned_calls == 2 and (self.rank is None or self.rank == torch.distributed.get_rank()):
                return RewardOutput(score=out.score * float("nan"), heatmap=out.heatmap)
        return out


class WriteLoraAfterEachStep(Callback):
    """``lora-rank<r>-step<n>.safetensors``: rank r's LoRA weights after step n."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from safetensors.torch import save_file

        from torch.distributed.tensor import DTensor

        lora = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()  # FSDP2: gathered
                for k, v in pl_module.state_dict().items() if "lora_" in k}
        save_file(lora, str(Path(self.folder, f"lora-rank{trainer.global_rank}-step{trainer.global_step}.safetensors")))
