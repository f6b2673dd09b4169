"""SD3 and FLUX.1 loading and flow-matching sampling: fnf's conditioning and Euler chain reproduce diffusers'
StableDiffusion3Pipeline / FluxPipeline image for image (with and without an exported LoRA), gradients flow through
the last K steps only, the fused base pass is exact, and the FNF step raises a reward on both families."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from fnf.export import save_lora
from fnf.flux import FluxModel
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import FlowMatchSampler, SamplerArgs, initial_noise, make_sampler
from fnf.sd3 import SD3Model
from fnf.worlds.random_sd import build_random_flux, build_random_sd3

PROMPTS, SEEDS = ["a red circle top left", "a blue square"], torch.tensor([3, 4])
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FAMILIES = {  # name: (builder kwargs, guidance scale, fnf class)
    "sd3": (dict(kind="sd3"), 3.0, SD3Model),
    "sd3-no-t5": (dict(kind="sd3", t5=False), 3.0, SD3Model),
    "flux-dev": (dict(kind="flux", guidance=True), 3.5, FluxModel),
    "flux-schnell": (dict(kind="flux", guidance=False), 1.0, FluxModel),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for name, (kwargs, _, _) in FAMILIES.items():
        kwargs = dict(kwargs)
        build = build_random_sd3 if kwargs.pop("kind") == "sd3" else build_random_flux
        dirs[name] = str(build(tmp_path_factory.mktemp(name) / "model", **kwargs))
    return dirs


def _images(model: Text2ImageModel, noise: torch.Tensor, args: SamplerArgs) -> torch.Tensor:
    with torch.no_grad():
        return make_sampler(model, args)(noise, model.encode_prompts(PROMPTS), model.unconditional().expand(2),
                                         "none").images


def _pipeline_images(pipe, model: Text2ImageModel, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    side = noise.shape[-1] * model.vae_scale_factor
    call = dict(num_inference_steps=4, guidance_scale=guidance, output_type="pt", height=side, width=side,
                max_sequence_length=model.t5_tokens)
    if isinstance(model, FluxModel):  # FluxPipeline takes x_T as packed tokens
        call["latents"] = pipe._pack_latents(noise, *noise.shape)
    else:
        call["latents"] = noise
    return pipe(PROMPTS, **call).images


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_exported_lora_match_the_diffusers_pipeline(family, model_dirs, tmp_path):
    _, guidance, kind = FAMILIES[family]
    model = Text2ImageModel.from_pretrained(model_dirs[family])
    assert isinstance(model, kind) and not any(p.requires_grad for p in model.parameters())
    model.add_lora(LoraArgs(rank=4, alpha=8, target_modules=TARGETS))
    noise = initial_noise(SEEDS, model.latent_shape(16), "cpu")
    args = SamplerArgs(num_steps=4, guidance_scale=guidance, resolution=16)
    with model.adapter_disabled():
        base = _images(model, noise, args)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3-no-t5" else {}  # diffusers wants them named
    pipe = DiffusionPipeline.from_pretrained(model_dirs[family], use_safetensors=True, **no_t5)
    torch.testing.assert_close(_pipeline_images(pipe, model, noise, guidance), base, rtol=0, atol=1e-5)

    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.2 * torch.randn_like(p))  # a "trained" LoRA that visibly changes images
    tuned = _images(model, noise, args)
    assert (tuned - base).abs().max() > 1e-2
    pipe.load_lora_weights(save_lora(model, tmp_path / "lora"))
    torch.testing.assert_close(_pipeline_images(pipe, model, noise, guidance), tuned, rtol=0, atol=1e-5)


def test_flux_schedule_follows_the_resolution_and_sd3_uses_its_shift(model_dirs):
    flux = Text2ImageModel.from_pretrained(model_dirs["flux-dev"])
    small, large = (FlowMatchSampler(flux, SamplerArgs(num_steps=4, resolution=r)).sigmas for r in (8, 32))
    assert small[0] == large[0] == 1.0 and small[-1] == large[-1] == 0.0
    assert all(s < l for s, l in zip(small[1:-1], large[1:-1]))  # more image tokens: more time at high noise
    sd3 = Text2ImageModel.from_pretrained(model_dirs["sd3"])
    shifted = FlowMatchSampler(sd3, SamplerArgs(num_steps=4)).sigmas
    sd3.scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd3.scheduler.config, shift=1.0)
    unshifted = FlowMatchSampler(sd3, SamplerArgs(num_steps=4)).sigmas
    assert all(s > u for s, u in zip(shifted[1:-1], unshifted[1:-1]))  # the folder's shift 3: more high-noise time


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_lv_renoising_is_the_schedulers_scale_noise(family, model_dirs):
    """Flow DRaFT-LV re-noises x_0 to step i as the scheduler's ``scale_noise`` does, (1 − σ_i)·x_0 + σ_i·ε, from
    Python floats (no device copies), at every step of the (shifted) schedule."""
    model = Text2ImageModel.from_pretrained(model_dirs[family])
    sampler = FlowMatchSampler(model, SamplerArgs(num_steps=6, resolution=16, grad_mode="lv"))
    x0, noise = torch.randn(2, *model.latent_shape(16)), torch.randn(2, *model.latent_shape(16))
    for i, t in enumerate(sampler.timesteps):
        expected = sampler.scheduler.scale_noise(x0, t.reshape(1), noise)
        torch.testing.assert_close(sampler._renoise(x0, noise, i), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_gradients_reach_the_lora_through_the_last_k_steps_only(family, model_dirs):
    model = Text2ImageModel.from_pretrained(model_dirs[family])
    model.add_lora(LoraArgs(rank=4, target_modules=TARGETS))
    calls = []
    model.transformer.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    sampler = make_sampler(model, SamplerArgs(num_steps=5, k=2, guidance_scale=FAMILIES[family][1], resolution=16,
                                              checkpointing="off"))
    noise = initial_noise(SEEDS, model.latent_shape(16), "cpu")
    text, uncond = model.encode_prompts(PROMPTS), model.unconditional().expand(2)
    sampler(noise, text, uncond, "last_k").images.mean().backward()
    assert calls == [False] * 3 + [True] * 2
    assert all(p.grad is not None for p in model.lora_parameters())
    assert sum(p.grad.abs().sum() for p in model.lora_parameters()) > 0


@pytest.mark.parametrize("family", ["sd3", "flux-dev", "flux-schnell"])
def test_sampling_levers_are_exact(family, model_dirs):
    """The default levers (fused base pass, LoRA folded in gradient-free and differentiable steps) against none,
    with the flow configs' LoRA targets (both streams' attention and the image MLP)."""
    model = Text2ImageModel.from_pretrained(model_dirs[family])
    model.add_lora(LoraArgs(rank=4, target_modules=[*TARGETS, "ff.net.0.proj", "ff.net.2"]))
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.2 * torch.randn_like(p))
    noise = initial_noise(SEEDS, model.latent_shape(16), "cpu")
    text, uncond = model.encode_prompts(PROMPTS), model.unconditional().expand(2)
    outputs = {}
    for levers in (True, False):
        off = {} if levers else dict(fused_base=False, fold_lora=False, fold_lora_grad=False)
        sampler = make_sampler(model, SamplerArgs(num_steps=4, k=2, guidance_scale=FAMILIES[family][1], resolution=16,
                                                  **off))
        base, tuned = sampler.with_base(noise, text, uncond, "last_k")
        tuned.images.mean().backward()
        outputs[levers] = (base.images, tuned.images.detach(), [p.grad.clone() for p in model.lora_parameters()])
        model.zero_grad(set_to_none=True)
    for ours, plain in zip(outputs[True][:2], outputs[False][:2]):
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    for ours, plain in zip(outputs[True][2], outputs[False][2]):
        torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-7)


def test_flux_takes_as_many_t5_tokens_as_its_variant_was_trained_with(model_dirs, tmp_path):
    """[dev] 512, [schnell] 256 (FLUX attends to the padding, so this changes images); the tiny tokenizers' limit
    (16) is raised here to see it."""
    import json
    import shutil

    for family, tokens in (("flux-dev", 512), ("flux-schnell", 256)):
        folder = shutil.copytree(model_dirs[family], tmp_path / family)
        config_file = folder / "tokenizer_2" / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 1024}))
        assert Text2ImageModel.from_pretrained(folder).t5_tokens == tokens
    assert Text2ImageModel.from_pretrained(model_dirs["flux-dev"]).t5_tokens == 16  # the tokenizer's own limit


def test_flux_schnell_refuses_a_guidance_scale(model_dirs):
    model = Text2ImageModel.from_pretrained(model_dirs["flux-schnell"])
    with pytest.raises(ValueError, match="guidance_scale=3.5: this model takes no guidance"):
        make_sampler(model, SamplerArgs(guidance_scale=3.5))


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_the_fnf_step_raises_a_reward(family, model_dirs, tmp_path):
    from test_module import _changes, _loader, _module, _trainer  # the SD1.x training test's setup

    module = _module(model_dirs[family], lam=0.0, lora=LoraArgs(rank=4, target_modules=TARGETS),
                     sampler=SamplerArgs(num_steps=4, k=2, guidance_scale=FAMILIES[family][1], resolution=16))
    _trainer(tmp_path, steps=10).fit(module, _loader())
    gain, _, _ = _changes(module)
    assert gain > 0.005, gain


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_the_train_mode_reaches_the_transformer_only(family, model_dirs):
    """LoRA dropout needs the transformer in train mode (and a dropout layer is never folded into the weight); the
    frozen text encoders and VAE stay in eval."""
    from test_module import _module

    module = _module(model_dirs[family], lam=0.0, lora=LoraArgs(rank=4, dropout=0.1, target_modules=TARGETS))
    module.train()
    assert module.model.transformer.training
    dropouts = [m for m in module.model.transformer.modules() if isinstance(m, torch.nn.Dropout) and m.p == 0.1]
    assert dropouts and all(m.training for m in dropouts)
    frozen = [child for name, child in module.model.named_children() if name != "transformer"] + [module.heads]
    assert frozen and not any(m.training for child in frozen for m in child.modules())
    module.eval()
    assert not module.model.transformer.training


def test_lv_samples_renoise_their_own_prompts_image_on_the_flow_path(model_dirs):
    """Flow DRaFT-LV: x_σ = (1 − σ)·x_0 + σ·ε at the last step's σ, one Euler step each. With the LoRA at
    identity a sample stays near its own prompt's plain image and far from the other prompt's; a prompt's samples
    differ."""
    model = Text2ImageModel.from_pretrained(model_dirs["sd3"])
    model.add_lora(LoraArgs(rank=4, target_modules=TARGETS))
    sampler = make_sampler(model, SamplerArgs(num_steps=20, guidance_scale=3.0, resolution=16, lv_samples=2))
    noise = initial_noise(SEEDS, model.latent_shape(16), "cpu")
    text, uncond = model.encode_prompts(PROMPTS), model.unconditional().expand(2)
    with torch.no_grad():
        plain = sampler(noise, text, uncond, "none").images
        lv = sampler(noise, text, uncond, "lv").images.unflatten(0, (2, 2))  # sample i of prompt b at i·B + b
    near = (lv - plain).abs().mean((2, 3, 4))
    far = (lv - plain.flip(0)).abs().mean((2, 3, 4))
    assert near.max() < 0.05 * far.min(), (near, far)
    assert not torch.equal(lv[0], lv[1])
