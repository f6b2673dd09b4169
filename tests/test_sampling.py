"""Sampler: where gradients flow (DRaFT / DRaFT-K / DRaFT-LV), determinism and the base pass."""

from __future__ import annotations

import pytest
import torch

from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise

STEPS = 5


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Text2ImageModel:
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4))
    return model


def _inputs(model, prompts, seeds):
    text = model.encode_prompts(prompts)
    return initial_noise(torch.tensor(seeds), model.latent_shape(16), "cpu"), text, model.encode_prompts([""] * len(prompts))


def _count_grad_unet_calls(model, sampler, mode, inputs) -> int:
    calls = []
    hook = model.unet.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    try:
        sampler(*inputs, grad_mode=mode)
    finally:
        hook.remove()
    return sum(calls)


@pytest.mark.parametrize("mode, expected", [("none", 0), ("last_k", 2), ("full", STEPS), ("lv", 1)])
def test_gradients_flow_only_through_the_chosen_steps(model, mode, expected):
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=2, checkpointing="off"))
    inputs = _inputs(model, ["a red circle"], [3])
    assert _count_grad_unet_calls(model, sampler, mode, inputs) == expected
    images = sampler(*inputs, grad_mode=mode).images
    assert images.requires_grad == (mode != "none")
    if mode != "none":
        images.sum().backward()
        grads = [p.grad for p in model.lora_parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        model.zero_grad(set_to_none=True)


def test_truncated_and_full_chains_give_the_same_images(model):
    inputs = _inputs(model, ["a red circle", "a blue square"], [1, 2])
    outputs = {mode: DDIMSampler(model, SamplerArgs(num_steps=STEPS, k=2))(*inputs, grad_mode=mode).images
               for mode in ("none", "last_k", "full")}
    torch.testing.assert_close(outputs["last_k"], outputs["none"], rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["full"], outputs["none"], rtol=0, atol=1e-6)


def test_stop_grad_on_unet_input_leaves_only_the_ddim_coefficients(model):
    """With x_t detached at the UNet input, d x_0 / d x_T is the product of sqrt(ᾱ_prev / ᾱ_t) over steps."""
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, grad_mode="full", unet_input="stop_grad",
                                             checkpointing="off", guidance_scale=1.0))
    noise, text, uncond = _inputs(model, ["a red circle"], [4])
    noise.requires_grad_(True)
    sampler(noise, text, uncond, grad_mode="full").latents.sum().backward()
    scheduler, expected = sampler.scheduler, torch.tensor(1.0, dtype=torch.float64)
    for t in scheduler.timesteps:
        prev = t - scheduler.config.num_train_timesteps // STEPS
        alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        expected = expected * (alpha_prev / scheduler.alphas_cumprod[t]).double().sqrt()
    torch.testing.assert_close(noise.grad, torch.full_like(noise, expected.item()), rtol=1e-5, atol=0)


def test_noise_and_images_do_not_depend_on_batch_composition(model):
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS))
    forward = sampler(*_inputs(model, ["a red circle", "a blue square"], [7, 8]), grad_mode="none").images
    backward = sampler(*_inputs(model, ["a blue square", "a red circle"], [8, 7]), grad_mode="none").images
    alone = sampler(*_inputs(model, ["a blue square"], [8]), grad_mode="none").images
    torch.testing.assert_close(forward.flip(0), backward, rtol=0, atol=1e-6)
    torch.testing.assert_close(forward[1:], alone, rtol=0, atol=1e-5)  # BLAS order only
    assert not torch.equal(initial_noise(torch.tensor([7]), (4, 8, 8), "cpu"),
                           initial_noise(torch.tensor([8]), (4, 8, 8), "cpu"))


def test_base_pass_is_the_base_model_bit_for_bit(model, tiny_model_dir):
    """LoRA B starts at 0 (I == I0 at step 0), and with the adapter disabled the UNet is the plain base model."""
    plain = Text2ImageModel.from_pretrained(tiny_model_dir)
    inputs = _inputs(model, ["a red circle"], [5])
    args = SamplerArgs(num_steps=STEPS)
    reference = DDIMSampler(plain, args)(*inputs, grad_mode="none").images
    tuned_at_init = DDIMSampler(model, args)(*inputs, grad_mode="none").images
    assert torch.equal(tuned_at_init, reference)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        assert not torch.equal(DDIMSampler(model, args)(*inputs, grad_mode="none").images, reference)
        with model.adapter_disabled():
            assert torch.equal(DDIMSampler(model, args)(*inputs, grad_mode="none").images, reference)
    finally:
        model.unet.delete_adapters("default")
        model.add_lora(LoraArgs(rank=4))


def test_each_sampler_owns_its_scheduler(model):
    """set_timesteps on a shared scheduler would give every sampler over the model the last one's steps."""
    inputs = _inputs(model, ["a red circle"], [6])
    five = DDIMSampler(model, SamplerArgs(num_steps=STEPS))
    before = five(*inputs, grad_mode="none").images
    three = DDIMSampler(model, SamplerArgs(num_steps=3))
    three(*inputs, grad_mode="none")
    assert len(five.scheduler.timesteps) == STEPS and len(three.scheduler.timesteps) == 3
    assert torch.equal(five(*inputs, grad_mode="none").images, before)


def test_lv_samples_each_renoise_their_own_prompts_image_with_their_own_noise(model):
    """DRaFT-LV re-noises x_0 to the last timestep, n times: with the LoRA at identity every sample lies near the
    plain chain's image of its own prompt (far from the other prompt's), and a prompt's n samples differ."""
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, grad_mode="lv", lv_samples=3))
    inputs = _inputs(model, ["a red circle", "a blue square"], [1, 2])
    with torch.no_grad():
        plain = sampler(*inputs, grad_mode="none").images
        lv = sampler(*inputs, grad_mode="lv").images
    assert lv.shape == (6, 3, 16, 16) and sampler.samples_per_prompt("lv") == 3
    lv = lv.unflatten(0, (3, 2))  # sample i of prompt b at row i·B + b
    near = (lv - plain).abs().mean((2, 3, 4))
    far = (lv - plain.flip(0)).abs().mean((2, 3, 4))
    assert near.max() < 0.05 * far.min(), (near, far)
    assert all(not torch.equal(lv[i, b], lv[j, b]) for b in range(2) for i in range(3) for j in range(i))


def test_lv_renoising_is_the_schedulers_add_noise_without_device_copies(model):
    """DDIMSampler._renoise computes add_noise's √ᾱ·x_0 + √(1 − ᾱ)·ε from Python floats (add_noise copies its
    timestep and ᾱ table to the device, a copy the host waits for); the same values at every step."""
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, grad_mode="lv"))
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i in range(STEPS):
        expected = sampler.scheduler.add_noise(x0, noise, sampler.timesteps[i].reshape(1))
        torch.testing.assert_close(sampler._renoise(x0, noise, i), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, message", [(dict(k=0), "model.sampler.k"), (dict(num_steps=3, k=4), "model.sampler.k"),
                                          (dict(guidance_scale=0.5), "guidance_scale"),
                                          (dict(lv_samples=0), "model.sampler.lv_samples")])
def test_bad_sampler_args_name_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplerArgs(**bad)


def test_unknown_model_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not found locally; download it or pass a path"):
        Text2ImageModel.from_pretrained("no-such-org/no-such-model")
    with pytest.raises(FileNotFoundError, match="no embedded model"):
        Text2ImageModel.from_pretrained("embedded:no-such-model")


def test_a_plugin_family_with_a_flow_scheduler_samples_or_says_what_it_lacks(tiny_model_dir):
    """A family that brings a FlowMatchEulerDiscreteScheduler (docs/plugins.md: the scheduler decides the sampler)
    samples by flow-matching Euler with the scheduler's fixed shift; a resolution-dependent shift or a stochastic
    scheduler is one line (FNF's I and I0 must come from one deterministic chain)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fnf.sampling import FlowMatchSampler, make_sampler

    model = Text2ImageModel.from_pretrained(tiny_model_dir)  # the base class: no flow_schedule of its own
    model.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sampler = make_sampler(model, SamplerArgs(num_steps=STEPS))
    assert isinstance(sampler, FlowMatchSampler) and len(sampler.sigmas) == STEPS + 1
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(STEPS)
    torch.testing.assert_close(sampler.timesteps, reference.timesteps)  # the fixed shift 3, as the scheduler sets it
    with torch.no_grad():
        images = sampler(*_inputs(model, ["a red circle"], [6]), grad_mode="none").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    model.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match=r"^Text2ImageModel: its scheduler shifts by resolution .* define "
                                         r"flow_schedule\(num_steps, latent_shape\)"):
        make_sampler(model, SamplerArgs(num_steps=STEPS))
    model.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match=r"^model.pretrained: the scheduler samples stochastically"):
        make_sampler(model, SamplerArgs(num_steps=STEPS))


def test_a_guided_step_is_the_cfg_formula_over_the_unconditional_and_prompt_rows(model):
    """ε_u + g·(ε_c − ε_u), ε_u from the empty prompt's rows, ε_c from the prompt's, each from its own denoiser
    call here; at guidance 1 the denoiser sees the prompt's rows only (CFG would double every call for nothing)."""
    noise, text, uncond = _inputs(model, ["a red circle", "a blue square"], [6, 7])
    with torch.no_grad():
        for scale in (1.0, 4.0):
            sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, guidance_scale=scale))
            t = sampler.timesteps[0]
            plain = model.predict(noise, t, text)
            guided = plain if scale == 1 else (lambda u: u + scale * (plain - u))(model.predict(noise, t, uncond))
            rows = []
            hook = model.unet.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
            try:
                stepped = sampler._step(noise, 0, sampler._guided(text, uncond))
            finally:
                hook.remove()
            torch.testing.assert_close(stepped, sampler._update(guided, 0, noise), rtol=0, atol=1e-5)
            assert rows == [2 if scale == 1 else 4]


def test_draft_lv_draws_fresh_noise_from_the_global_generator(model):
    """Each call re-noises with new noise (a fixed draw would give every step the same variance-reduction
    samples); the same seed_everything state gives the same samples (exact resume)."""
    inputs = _inputs(model, ["a red circle"], [6])
    sampler = DDIMSampler(model, SamplerArgs(num_steps=STEPS, grad_mode="lv", lv_samples=2))
    with torch.no_grad():
        torch.manual_seed(1)
        first, second = (sampler(*inputs, grad_mode="lv").images for _ in range(2))
        torch.manual_seed(1)
        again = sampler(*inputs, grad_mode="lv").images
        torch.manual_seed(2)
        other = sampler(*inputs, grad_mode="lv").images
    assert torch.equal(first, again)
    assert (first - second).abs().amax() > 1e-3 and (first - other).abs().amax() > 1e-3
