"""No host-device syncs in the sampling passes: the UNet's inputs live on its device, nothing reads device values.

On the CPU the model runs on the ``meta`` device, which has no values: any ``.item()``, ``bool(tensor)`` or
Python indexing by a device tensor raises there, and a forward hook checks that every tensor handed to the UNet
(latents, timestep, conditioning) is on the model's device. On a GPU, ``torch.cuda.set_sync_debug_mode("error")``
checks the same passes for real.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fnf.data import collate
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs, Text2ImageModel, TextEmbedding
from fnf.rewards import ColorRegion
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise


class HostCopies(TorchDispatchMode):
    """Records every copy of a CPU tensor to another device (``.to(device)``, ``copy_``): on a GPU a plain one makes
    the host wait for the queue (fnf copies from pinned memory, outside the passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[1] if func is torch.ops.aten.copy_.default else args[0]
            target = args[0] if func is torch.ops.aten.copy_.default else out
            if source.device.type == "cpu" and target.device.type != "cpu":
                self.copies.append(f"{func}: {tuple(source.shape)} cpu -> {target.device}")
        return out


def _unet_input_devices(model: Text2ImageModel) -> list[set[str]]:
    seen = []

    def record(module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        seen.append({str(t.device) for t in tensors})

    model.unet.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("mode", ["none", "last_k", "lv", "full"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-pass"])
def test_sampling_passes_never_read_device_values(tiny_model_dir, mode, fused):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4))
    text, uncond = model.encode_prompts(["a red circle", "a blue square"]), model.unconditional().expand(2)
    model.to("meta")
    text, uncond = TextEmbedding(text.hidden.to("meta")), TextEmbedding(uncond.hidden.to("meta"))
    seen = _unet_input_devices(model)
    sampler = DDIMSampler(model, SamplerArgs(num_steps=4, k=2, guidance_scale=7.5, fused_base=fused))
    noise = initial_noise([1, 2], model.latent_shape(16), "meta")
    sampler._timesteps_on("meta")  # the timesteps' one copy per device, cached for every later pass
    with HostCopies() as host:
        base, tuned = sampler.with_base(noise, text, uncond, mode)
        if mode != "none":
            tuned.images.sum().backward()
    assert base.images.device.type == tuned.images.device.type == "meta"
    assert seen and all(devices == {"meta"} for devices in seen)
    assert host.copies == []  # DRaFT-LV's re-noising copied its timestep and ᾱ table (diffusers' add_noise)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["last_k", "lv"])
def test_training_step_sampling_has_no_cuda_syncs(tiny_model_dir, mode):
    """One FNF training step on a GPU; its sampling passes (base + tuned, fused) run under sync-debug 'error'."""
    module = FocusNFix(rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=tiny_model_dir, lam=0.1,
                       sampler=SamplerArgs(num_steps=4, k=2, grad_mode=mode), lora=LoraArgs(rank=4),
                       optimizer=partial(torch.optim.AdamW, lr=1e-3)).cuda()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    with_base = module.sampler.with_base

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return with_base(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    module.sampler.with_base = strict
    batch = collate([{"prompt": "a red circle", "seed": 1}, {"prompt": "a blue square", "seed": 2}])
    module.training_step(batch, 0)["loss"].backward()
    torch.cuda.set_sync_debug_mode("error")
    try:  # x_T is drawn on the CPU and copied from pinned memory: the host does not wait for it either
        initial_noise([1, 2], module.latent_shape, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p.grad).all() for p in module.model.lora_parameters() if p.grad is not None)
