"""SDXL loading: fnf's conditioning (two encoders, pooled text, size ids, zeroed unconditional) reproduces diffusers'
StableDiffusionXLPipeline image for image, with and without an exported LoRA, and the FNF step trains on it."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from fnf.export import save_lora
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise
from fnf.sdxl import SDXLModel
from fnf.worlds.random_sd import build_random_sdxl

PROMPTS, SEEDS = ["a red circle top left", "a blue square"], torch.tensor([3, 4])


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    return str(build_random_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model"))


def _fnf_images(model: Text2ImageModel, noise: torch.Tensor, args: SamplerArgs) -> torch.Tensor:
    with torch.no_grad():
        return DDIMSampler(model, args)(noise, model.encode_prompts(PROMPTS), model.unconditional().expand(2),
                                        "none").images


def test_sdxl_folder_loads_as_sdxl_with_everything_frozen(sdxl_dir):
    model = Text2ImageModel.from_pretrained(sdxl_dir)
    assert isinstance(model, SDXLModel) and model.zero_unconditional
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.text_encoder_2.training


def test_fnf_sdxl_images_and_exported_lora_match_the_diffusers_pipeline(sdxl_dir, tmp_path):
    model = Text2ImageModel.from_pretrained(sdxl_dir)
    model.add_lora(LoraArgs(rank=4, alpha=8))
    noise = initial_noise(SEEDS, model.latent_shape(16), "cpu")
    args = SamplerArgs(num_steps=4, guidance_scale=3.0)
    with model.adapter_disabled():
        base = _fnf_images(model, noise, args)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    call = dict(latents=noise, num_inference_steps=4, guidance_scale=3.0, eta=0.0, output_type="pt", height=16, width=16)
    torch.testing.assert_close(pipe(PROMPTS, **call).images, base, rtol=0, atol=1e-4)

    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" LoRA that visibly changes images
    tuned = _fnf_images(model, noise, args)
    assert (tuned - base).abs().max() > 1e-2
    pipe.load_lora_weights(save_lora(model, tmp_path / "lora"))
    torch.testing.assert_close(pipe(PROMPTS, **call).images, tuned, rtol=0, atol=1e-4)


def test_the_fnf_step_raises_a_reward_on_sdxl(sdxl_dir, tmp_path):
    from test_module import _changes, _loader, _module, _trainer  # the SD1.x training test's setup, on SDXL

    module = _module(sdxl_dir, lam=0.0)
    _trainer(tmp_path, steps=10).fit(module, _loader())
    gain, _, _ = _changes(module)
    assert gain > 0.005, gain


@pytest.mark.parametrize("force_upcast", [True, False])
def test_under_float16_the_vae_stays_float32_and_decodes_in_float32_when_its_config_asks(sdxl_dir, force_upcast):
    """SDXL's VAE overflows in float16 (NaN images on real weights); diffusers upcasts it for decoding when its
    config says force_upcast. fnf keeps it float32 under 16-mixed and decodes with autocast off; the decode stays
    differentiable. The fp16-fix VAE (force_upcast: false) runs in float16 like the rest."""
    from types import SimpleNamespace

    from fnf.compute import ComputeArgs, apply_compute

    model = Text2ImageModel.from_pretrained(sdxl_dir)
    model.vae.register_to_config(force_upcast=force_upcast)
    apply_compute(model, ComputeArgs(), SimpleNamespace(precision="16-mixed"))
    assert model.unet.dtype == torch.float16 and model.text_encoder_2.dtype == torch.float16
    assert model.vae.dtype == (torch.float32 if force_upcast else torch.float16)
    outputs = []
    model.vae.decoder.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        images = model.decode(latents)
    assert outputs == [torch.float32 if force_upcast else torch.float16]
    images.float().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert model.float32_parts(torch.bfloat16) == ()  # bfloat16 has float32's range: stored like the rest
