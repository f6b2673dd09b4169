"""The sampling levers: I0 and I share one UNet call per gradient-free step (fused_base), the LoRA runs folded into
one weight in gradient-free (fold_lora) and differentiable steps (fold_lora_grad), and nothing else changes:
compared with two passes through peft's layers.

A batch of 2B or 4B rows rounds differently from B rows (BLAS blocking), and guidance 7.5 amplifies that per step:
in float32 the latents (|x_0| up to ~16 on these random models) agree to 1e-4 with CFG and bit for bit without,
images to 1e-5; LoRA gradients to 1e-5 except full DRaFT with CFG (5 differentiable steps: 2e-5 on a gradient
whose largest entry is 1.75). In float64 every path agrees to 1e-10: the levers are the same arithmetic.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from diffusers.models.attention_processor import Attention
from peft.tuners.lora import Linear as LoraLinear

from fnf import lora_passes
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise
from fnf.worlds.random_sd import build_random_sdxl

STEPS, K = 5, 2
PROMPTS = ["a red circle top left", "a blue square"]


TOLERANCE = {torch.float32: dict(latents=1e-4, images=1e-5, grads=3e-5),
             torch.float64: dict(latents=1e-10, images=1e-10, grads=1e-10)}


def _trained_looking(model_dir: str, dtype: torch.dtype = torch.float32, dropout: float = 0.0) -> Text2ImageModel:
    """A model whose LoRA changes the output (B != 0), as after some training; scale α / r = 2, so a fold that
    dropped the scale would show."""
    model = Text2ImageModel.from_pretrained(model_dir).to(dtype)
    model.add_lora(LoraArgs(rank=4, alpha=8, dropout=dropout,
                            target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def model(tiny_model_dir, request) -> Text2ImageModel:
    return _trained_looking(tiny_model_dir, request.param)


def _inputs(model):
    noise = initial_noise([3, 4], model.latent_shape(model.resolution), "cpu").to(model.unet.dtype)
    return noise, model.encode_prompts(PROMPTS), model.unconditional().expand(len(PROMPTS))


PLAIN = dict(fused_base=False, fold_lora=False, fold_lora_grad=False)
LEVERS = [dict(), PLAIN | dict(fused_base=True), PLAIN | dict(fold_lora=True), PLAIN | dict(fold_lora_grad=True)]


def _pair(model, mode, guidance, **levers):
    """(I0, I, LoRA gradient of a loss on I) with these levers."""
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=K, guidance_scale=guidance, **levers))
    torch.manual_seed(1)  # DRaFT-LV's re-noising
    base, tuned = sampler.with_base(*_inputs(model), mode)
    if mode == "none":
        return base, tuned, None
    weights = torch.linspace(-1, 1, tuned.images.numel()).reshape(tuned.images.shape)
    (tuned.images * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.lora_parameters()])
    model.zero_grad(set_to_none=True)
    return base, tuned, grads


@pytest.mark.parametrize("levers", LEVERS, ids=["all", "fused", "folded", "folded-grad"])
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("mode", ["none", "last_k", "lv", "full"])
def test_levers_equal_two_plain_passes(model, mode, guidance, levers):
    base, tuned, grads = _pair(model, mode, guidance, **levers)
    base_ref, tuned_ref, grads_ref = _pair(model, mode, guidance, **PLAIN)
    tol = TOLERANCE[model.unet.dtype]
    for ours, reference in ((base, base_ref), (tuned, tuned_ref)):
        torch.testing.assert_close(ours.latents, reference.latents, rtol=0, atol=tol["latents"])
        torch.testing.assert_close(ours.images, reference.images, rtol=0, atol=tol["images"])
    assert not base.images.requires_grad and tuned.images.requires_grad == (mode != "none")
    assert (tuned.images[:len(base.images)] - base.images).abs().max() > 1e-2  # the LoRA matters: rows told apart
    if grads is not None:
        assert grads.abs().max() > 0
        torch.testing.assert_close(grads, grads_ref, rtol=tol["grads"], atol=tol["grads"])


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "hooks"])
def test_fused_base_rows_are_the_adapter_free_model(model, fold):
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=K, fold_lora=fold))
    base, _ = sampler.with_base(*_inputs(model), "last_k")
    with torch.no_grad(), model.adapter_disabled():
        reference = sampler(*_inputs(model), "none")
    torch.testing.assert_close(base.latents, reference.latents, rtol=0, atol=TOLERANCE[model.unet.dtype]["latents"])


def test_fused_pass_shares_every_gradient_free_step(model):
    """DRaFT-K with CFG: STEPS-K calls over 4B rows, then K base-only and K tuned-only calls over 2B rows."""
    rows = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=K, checkpointing="off")).with_base(*_inputs(model), "last_k")
    finally:
        hook.remove()
    batch = len(PROMPTS)
    assert rows == [4 * batch] * (STEPS - K) + [2 * batch] * (2 * K)


def test_fused_pass_on_sdxl(tmp_path_factory):
    model = _trained_looking(str(build_random_sdxl(tmp_path_factory.mktemp("sdxl") / "model")), torch.float64)
    base, tuned, grads = _pair(model, "last_k", 7.5, **LEVERS[0])
    base_ref, tuned_ref, grads_ref = _pair(model, "last_k", 7.5, **PLAIN)
    torch.testing.assert_close(base.latents, base_ref.latents, rtol=0, atol=1e-10)
    torch.testing.assert_close(tuned.latents, tuned_ref.latents, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads, grads_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("levers, peft_lora_runs",
                         [(dict(), False), (dict(fold_lora_grad=False), True), (dict(fold_lora=False), True)],
                         ids=["both", "no-grad-only", "grad-only"])
def test_folded_layers_replace_peft_lora(model, levers, peft_lora_runs):
    """With both folds on, peft's LoRA A projections never run in a DRaFT-K step (checkpoint recomputation and
    backward included); with either off, they do."""
    calls = []
    hooks = [m.register_forward_hook(lambda *args: calls.append(1)) for name, m in model.unet.named_modules()
             if ".lora_A." in name and isinstance(m, torch.nn.Linear)]
    try:
        _pair(model, "last_k", 7.5, **levers)
    finally:
        for hook in hooks:
            hook.remove()
    assert bool(calls) == peft_lora_runs


def test_gradient_free_steps_run_in_inference_mode_and_return_normal_tensors(model):
    modes = []
    hook = model.unet.register_forward_pre_hook(lambda module, args: modes.append(torch.is_inference_mode_enabled()))
    try:
        sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=K, checkpointing="off"))
        base, tuned = sampler.with_base(*_inputs(model), "last_k")
    finally:
        hook.remove()
    assert modes == [True] * (STEPS - K) + [False] * (2 * K)
    assert not any(t.is_inference() for t in (base.latents, base.images, tuned.latents, tuned.images))
    base.images.requires_grad_(True)  # gradient saliency of I0 needs this (inference tensors refuse it)


def test_cross_attention_projects_the_prompt_once_per_gradient_free_pass(model, monkeypatch):
    """The prompt embedding is the same tensor at every gradient-free step, so each cross-attention key / value
    projection computes it once per pass and hands the same output to the other steps."""
    computed, called = Counter(), Counter()
    reusing = lora_passes._reusing_last_output

    def counted(forward):
        layer = object()

        def compute(x):
            computed[layer] += 1
            return forward(x)

        reuse = reusing(compute)

        def call(x):
            called[layer] += 1
            return reuse(x)

        return call

    monkeypatch.setattr(lora_passes, "_reusing_last_output", counted)
    DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=K)).with_base(*_inputs(model), "last_k")
    assert len(called) == 2 * sum(isinstance(m, Attention) and m.is_cross_attention for m in model.unet.modules())
    assert set(called.values()) == {STEPS - K} and set(computed.values()) == {1}


def test_a_reused_projection_is_recomputed_for_another_prompt_tensor():
    """Reuse is by tensor identity: another prompt embedding (even with equal values) gets its own projection."""
    calls = []
    project = lora_passes._reusing_last_output(lambda x: calls.append(x) or x * 2)
    first, second = torch.ones(2), torch.full((2,), 3.0)
    assert torch.equal(project(first), 2 * first) and torch.equal(project(first), 2 * first)
    assert torch.equal(project(second), 2 * second)
    assert torch.equal(project(first.clone()), 2 * first)
    assert len(calls) == 3


def test_sharded_weights_are_not_folded(tiny_model_dir):
    """FSDP1 leaves a 1-D view of the rank's slice where a weight was (FSDP2 a DTensor, covered by its tests):
    such layers keep peft's forward instead of folding a weight that is not all there."""
    model = _trained_looking(tiny_model_dir)
    layer = next(m for m in model.unet.modules() if isinstance(m, LoraLinear))
    assert lora_passes._foldable(layer)
    layer.base_layer.weight = torch.nn.Parameter(layer.base_layer.weight.detach().flatten()[:3], requires_grad=False)
    assert not lora_passes._foldable(layer) and layer not in lora_passes.FoldedLora(model.lora_layers()).forwards


def test_lora_dropout_is_not_folded_away_in_train_mode(tiny_model_dir):
    """With LoRA dropout and the UNet in train mode, every pass must drop (peft's forward): a folded W + s·B·A would
    silently train without dropout. In eval mode there is nothing to drop, and the fold is exact again."""
    model = _trained_looking(tiny_model_dir, dropout=0.5)
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=K))
    layer = next(m for m in model.unet.modules() if isinstance(m, LoraLinear))
    images = {}
    for training in (True, False):
        model.unet.train(training)
        assert lora_passes._foldable(layer) != training
        with torch.no_grad():
            images[training] = [sampler.with_base(*_inputs(model), "last_k")[1].images for _ in range(2)]
    assert not torch.equal(*images[True]) and torch.equal(*images[False])
