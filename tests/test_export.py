"""LoRA export round trip: a plain diffusers pipeline with ``load_lora_weights`` draws fnf's images."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from fnf.export import save_lora
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION + ["conv1", "conv2"]],
                         ids=["attention", "attention+resnet-conv"])
def test_exported_lora_reproduces_fnf_images_in_plain_diffusers(tiny_model_dir, tmp_path, targets):
    """The shapes configs also put LoRA on the ResNet convolutions (configs/artifacts.yaml: conv1, conv2)."""
    torch.manual_seed(0)
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        for p in model.lora_parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" LoRA that visibly changes images
    prompts, seeds = ["a red circle top left", "a blue square"], torch.tensor([11, 12])
    noise = initial_noise(seeds, model.latent_shape(16), "cpu")
    args = SamplerArgs(num_steps=4, guidance_scale=3.0)
    with torch.no_grad():
        ours = DDIMSampler(model, args)(noise, model.encode_prompts(prompts), model.encode_prompts([""] * 2), "none").images
        with model.adapter_disabled():
            base = DDIMSampler(model, args)(noise, model.encode_prompts(prompts), model.encode_prompts([""] * 2), "none").images
    assert (ours - base).abs().max() > 1e-2

    directory = save_lora(model, tmp_path / "lora")
    state = load_file(directory / "pytorch_lora_weights.safetensors")
    assert state and all("lora" in key for key in state)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(directory)
    theirs = pipe(prompts, latents=noise, num_inference_steps=4, guidance_scale=3.0, eta=0.0, output_type="pt").images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_export_replaces_a_previous_export_atomically(tiny_model_dir, tmp_path):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4))
    save_lora(model, tmp_path / "lora")
    save_lora(model, tmp_path / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no staging folders left behind
