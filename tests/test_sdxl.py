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
