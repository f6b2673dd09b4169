"""FSDP2 (CPU, gloo) through Lightning's ModelParallelStrategy: the UNet is sharded, and 2 processes train
exactly like 1 with the same global batch (``strategy: fsdp``, FSDP1, needs CUDA: benchmarks/gpu_smoke.sh)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distributed_fit import fit  # tests/distributed_fit.py
from fnf.export import WEIGHT_NAME
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ColorRegion

FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}}
CLIP = 1e-3  # below every step's gradient norm (about 2e-3): clipping is active, and needs the norm over all shards


def test_two_process_fsdp2_equals_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    one = fit(tmp_path, tiny_model_dir, "devices1", batch_size=4, gradient_clip_val=CLIP)
    probe = {"class_path": "fsdp_probe.WriteShardSizes", "init_args": {"folder": str(tmp_path / "fsdp2")}}
    two = fit(tmp_path, tiny_model_dir, "fsdp2", batch_size=2, devices=2, strategy=FSDP2, gradient_clip_val=CLIP,
              callbacks=[probe])
    # The checkpoint (assembled on rank 0) holds the LoRA only, and the same weights. LoRA B is about 1e-4 after
    # 3 steps, so 1e-5 would let a 10% error pass; batch-2 vs batch-4 float noise leaves about 3e-9.
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-7, msg=name)
    exported = [load_file(tmp_path / run / "lora" / WEIGHT_NAME) for run in ("devices1", "fsdp2")]
    assert exported[0].keys() == exported[1].keys() and len(exported[0]) == len(one)  # gathered, whole tensors
    for name in exported[0]:
        torch.testing.assert_close(exported[1][name], exported[0][name], rtol=0, atol=1e-7, msg=name)

    shards = [json.loads((tmp_path / "fsdp2" / f"shards-rank{rank}.json").read_text()) for rank in (0, 1)]
    unet = [s["unet"] for s in shards]
    for rank in (0, 1):  # every UNet weight, frozen and LoRA, is a DTensor; each rank stores half of the numbers
        assert unet[rank]["dtensors"] == unet[rank]["params"] > unet[rank]["lora_dtensors"] == len(one)
        assert unet[rank]["local_numel"] < unet[rank]["numel"]
        for whole in ("text_encoder", "heads"):  # frozen and small: replicated, not sharded
            part = shards[rank][whole]
            assert part["dtensors"] == 0 and part["local_numel"] == part["numel"]
        assert shards[rank]["checkpoint_io"] == "AtomicCheckpointIO"  # the CLI's atomic writer still saves
        assert shards[rank]["sharded_blocks"] == shards[rank]["blocks"] > 0  # per block: one gathered at a time
    assert unet[0]["local_numel"] + unet[1]["local_numel"] == unet[0]["numel"]


def test_two_process_fsdp2_shards_a_flux_transformer_block_by_block_and_equals_one_process(tmp_path):
    """FLUX.1-shaped (double- and single-stream blocks, embedded guidance): every block is a sharded unit of its
    own, every transformer weight a DTensor, and 2 processes train as 1 with the same global batch."""
    from fnf.worlds.random_sd import build_random_flux

    model = str(build_random_flux(tmp_path / "flux"))
    small = ("--model.sampler.resolution", "16")  # FLUX's default is 1024 px, 256 with the tiny VAE
    one = fit(tmp_path, model, "devices1", batch_size=4, args=small)
    probe = {"class_path": "fsdp_probe.WriteShardSizes", "init_args": {"folder": str(tmp_path / "fsdp2")}}
    two = fit(tmp_path, model, "fsdp2", batch_size=2, args=small, devices=2, strategy=FSDP2, callbacks=[probe])
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-7, msg=name)
    for rank in (0, 1):
        shards = json.loads((tmp_path / "fsdp2" / f"shards-rank{rank}.json").read_text())
        assert shards["sharded_blocks"] == shards["blocks"] > 0
        assert shards["unet"]["dtensors"] == shards["unet"]["params"]
        assert shards["unet"]["local_numel"] < shards["unet"]["numel"]


def test_tensor_parallelism_is_refused_by_name(tiny_model_dir):
    """ModelParallelStrategy's defaults (tensor_parallel_size: auto = all GPUs of a node) would leave the UNet
    unsharded and the LoRA unsynchronised while the ranks train on different prompts."""
    module = FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=tiny_model_dir, lora=LoraArgs(rank=4))
    module._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2)}  # what the strategy sets, 1 × 2
    with pytest.raises(ValueError, match="tensor_parallel_size must be 1"):
        module.configure_model()


@pytest.mark.slow  # about 65 s
def test_fsdp2_resume_from_a_mid_run_checkpoint_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    # AdamW, not SGD: Lightning 2.6.6's ModelParallelStrategy cannot load an empty optimizer state (SGD without
    # momentum): IndexError in _rekey_optimizer_state_if_needed.
    adam = ("--model.optimizer", "torch.optim.AdamW")
    every_step = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}}
    fit(tmp_path, tiny_model_dir, "straight", batch_size=2, args=adam, devices=2, strategy=FSDP2, max_steps=5,
        callbacks=[every_step])
    checkpoints = tmp_path / "straight" / "checkpoints"
    resume = ("--ckpt_path", str(checkpoints / "step=3.ckpt"))  # as if killed after step 3
    resumed = fit(tmp_path, tiny_model_dir, "resumed", batch_size=2, args=(*adam, *resume), devices=2,
                  strategy=FSDP2, max_steps=5)
    straight = torch.load(checkpoints / "step=5.ckpt", weights_only=True)["state_dict"]
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name in straight:  # measured: identical
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
