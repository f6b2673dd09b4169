"""Speed levers of fnf/compute.py: frozen weights in the compute dtype, channels_last, compilation — same training."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from fnf.compute import ComputeArgs, apply_compute
from fnf.data import collate
from fnf.module import FocusNFix, RewardTerm
from fnf.pipeline import LoraArgs
from fnf.rewards import ColorRegion
from fnf.sampling import SamplerArgs

ITEMS = [{"prompt": p, "seed": i} for i, p in enumerate(["a red circle top left", "a blue square", "a green circle",
                                                          "a red square"])]


class FirstStep(L.Callback):
    """The first step's loss, LoRA gradients and the dtypes of what the optimizer holds."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.loss = outputs["loss"].detach().float()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads = torch.cat([p.grad.flatten() for p in module.model.lora_parameters()])


def _first_step(model_dir: str, tmp_path, precision: str, lam: float = 0.1, resolution: int | None = None,
                **compute) -> tuple[FocusNFix, FirstStep]:
    torch.manual_seed(0)
    module = FocusNFix(rewards=[RewardTerm(ColorRegion(), mask="heatmap")], pretrained=model_dir, lam=lam,
                       sampler=SamplerArgs(num_steps=4, k=2, guidance_scale=3.0, resolution=resolution),
                       lora=LoraArgs(rank=4),
                       optimizer=partial(torch.optim.AdamW, lr=1e-3), compute=ComputeArgs(**compute))
    probe = FirstStep()
    L.Trainer(max_steps=1, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
              callbacks=[probe]).fit(module, DataLoader(ITEMS, batch_size=4, collate_fn=collate))
    return module, probe


def _frozen_bytes(module: FocusNFix) -> int:
    return sum(p.numel() * p.element_size() for p in module.model.parameters() if not p.requires_grad)


def test_bf16_frozen_weights_train_like_float32_weights_under_autocast(tiny_model_dir, tmp_path):
    reference, ref_step = _first_step(tiny_model_dir, tmp_path, "bf16-mixed", frozen_dtype="float32")
    module, step = _first_step(tiny_model_dir, tmp_path, "bf16-mixed")  # auto -> bfloat16
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert _frozen_bytes(module) * 2 == _frozen_bytes(reference)  # the loaded model's weights halve
    lora = module.model.lora_parameters()
    assert {p.dtype for p in lora} == {torch.float32} and step.grads.dtype == torch.float32
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft's per-layer cast to float32, which autocast undid: off

    for model, cast in ((module.model, False), (reference.model, True)):
        layers = [m for m in model.unet.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and {m.cast_input_dtype_enabled for m in layers} == {cast}
    state = module.trainer.optimizers[0].state
    assert {t.dtype for p in lora for t in state[p].values() if t.is_floating_point() and t.dim()} == {torch.float32}
    # Autocast already ran the float32 path's matmuls and convs on bf16 copies of the same weights; what differs is
    # the bf16 rounding of the weights of ops autocast runs in float32 (norms, embeddings). Measured: loss 1.0e-3
    # relative, gradient cosine 0.998, gradient norm 3e-4 relative.
    torch.testing.assert_close(step.loss, ref_step.loss, rtol=5e-3, atol=0)
    cosine = torch.nn.functional.cosine_similarity(step.grads, ref_step.grads, dim=0)
    assert cosine > 0.99, cosine
    torch.testing.assert_close(step.grads.norm(), ref_step.grads.norm(), rtol=1e-2, atol=0)


def test_float32_precision_keeps_float32_weights_and_channels_last_trains_the_same(tiny_model_dir, tmp_path):
    reference, ref_step = _first_step(tiny_model_dir, tmp_path, "32-true")
    module, step = _first_step(tiny_model_dir, tmp_path, "32-true", memory_format="channels_last")
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert module.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # decode too
    torch.testing.assert_close(step.loss, ref_step.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(step.grads, ref_step.grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute, trainer, message", [
    (dict(frozen_dtype="bfloat16"), dict(precision="32-true"), "model.compute.frozen_dtype=bfloat16 needs trainer.precision bf16-mixed"),
    (dict(frozen_dtype="float16"), dict(precision="bf16-mixed"), "model.compute.frozen_dtype=float16 needs trainer.precision 16-mixed"),
    (dict(compile="unet+graphs"), dict(precision="32-true"), "compile=unet\\+graphs needs a CUDA device"),
    (dict(compile="unet"), dict(precision="32-true", strategy=ModelParallelStrategy()), "not supported with FSDP"),
    (dict(compile="unet+graphs"), dict(precision="32-true", strategy=ModelParallelStrategy()),
     "compile=unet\\+graphs is not supported with FSDP"),
])
def test_unsupported_combinations_fail_naming_the_key(tiny_model_dir, compute, trainer, message):
    module = FocusNFix(rewards=[RewardTerm(ColorRegion())], pretrained=tiny_model_dir, lora=LoraArgs(rank=4))
    strategy = trainer.pop("strategy", SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(ValueError, match=message):
        apply_compute(module.model, ComputeArgs(**compute), SimpleNamespace(strategy=strategy, **trainer))


@pytest.mark.parametrize("precision, mixed, stored", [("16-true", "16-mixed", "float16"),
                                                     ("bf16-true", "bf16-mixed", "bfloat16")])
def test_a_half_precision_lora_is_pointed_at_its_own_mixed_precision(precision, mixed, stored):
    """The advice keeps the user's half type: float16 hardware (no bf16) must not be told to use bf16."""
    from fnf.compute import frozen_dtype

    with pytest.raises(ValueError) as error:
        frozen_dtype(ComputeArgs(), precision)
    assert str(error.value) == (f"trainer.precision={precision}: LoRA weights, their gradients and optimizer state "
                                f"stay float32 in fnf; use {mixed} (the frozen weights are then stored in {stored})")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd3", "flux"])
def test_compiled_denoiser_trains_like_eager(family, tiny_model_dir, tmp_path):
    """λ = 0: at the first step I == I0, where the unsquared Frobenius norm has a kink; compiled kernels differ
    between the gradient-free and the differentiable steps by rounding, and the kink turns that rounding into
    a gradient of norm λ in a random direction (eager runs both on the same kernels: exactly I == I0).
    SD3's transformer names no repeated blocks in diffusers: fnf compiles its MMDiT blocks itself."""
    from fnf.worlds.random_sd import build_random_flux, build_random_sd3

    model_dir, resolution = tiny_model_dir, None
    if family != "sd1":
        build = build_random_sd3 if family == "sd3" else build_random_flux
        model_dir, resolution = str(build(tmp_path / family)), 16
    _, eager = _first_step(model_dir, tmp_path, "32-true", lam=0.0, resolution=resolution)
    module, compiled = _first_step(model_dir, tmp_path, "32-true", lam=0.0, resolution=resolution, compile="unet")
    assert module.model.denoiser._fnf_compiled
    assert any(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in module.model.denoiser.modules())
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-5)
    # inductor fuses and reorders float32 arithmetic: gradients agree to rounding, not bit for bit
    assert torch.nn.functional.cosine_similarity(compiled.grads, eager.grads, dim=0) > 0.9999
    torch.testing.assert_close(compiled.grads.norm(), eager.grads.norm(), rtol=1e-3, atol=0)


def test_regional_compilation_finds_sd3_blocks_and_refuses_a_denoiser_without_any(tmp_path):
    """diffusers' compile_repeated_blocks raises on SD3's transformer (no _repeated_blocks): fnf compiles its
    MMDiT blocks; a plugin denoiser with no known blocks gets one line (compiling nothing would be silent)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock

    from fnf.compute import compile_repeated_blocks
    from fnf.worlds.random_sd import build_random_sd3

    transformer = SD3Transformer2DModel.from_pretrained(build_random_sd3(tmp_path / "sd3") / "transformer")
    compile_repeated_blocks(transformer, "unet", mode=None)  # torch.compile is lazy: nothing compiles until a call
    blocks = [m for m in transformer.modules() if isinstance(m, JointTransformerBlock)]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert transformer._compiled_call_impl is None  # regional: the blocks, not the whole model
    with pytest.raises(ValueError, match=r"^model.compute.compile=unet: Linear names no repeated blocks to compile"):
        compile_repeated_blocks(torch.nn.Linear(2, 2), "unet", mode=None)
