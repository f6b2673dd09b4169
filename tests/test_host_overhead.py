"""Host work the sampling passes do not repeat: walks over the denoiser's modules (its LoRA layers are found once)
and diffusers' inspection of an attention processor's signature on every attention call."""

from __future__ import annotations

import inspect

import torch

from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.sampling import DDIMSampler, SamplerArgs, initial_noise


def _model_and_pass(tiny_model_dir):
    model = Text2ImageModel.from_pretrained(tiny_model_dir)
    model.add_lora(LoraArgs(rank=4))
    sampler = DDIMSampler(model, SamplerArgs(num_steps=4, k=2, guidance_scale=7.5))
    text, uncond = model.encode_prompts(["a red circle", "a blue square"]), model.unconditional().expand(2)
    noise = initial_noise([1, 2], model.latent_shape(16), "cpu")

    def training_pass():
        base, tuned = sampler.with_base(noise, text, uncond, "last_k")  # fused, folded, checkpointed: all defaults
        tuned.images.sum().backward()
        with model.adapter_disabled():
            sampler(noise, text, uncond, "none")

    return model, training_pass


def test_sampling_passes_do_not_walk_the_denoisers_modules(tiny_model_dir, monkeypatch):
    model, training_pass = _model_and_pass(tiny_model_dir)
    training_pass()  # the LoRA layers are found here, once
    walks, named_modules = [], torch.nn.Module.named_modules

    def counting(self, *args, **kwargs):
        walks.extend([type(self).__name__] if self is model.unet else [])
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    training_pass()
    assert walks == []


def test_attention_calls_do_not_inspect_their_processor(tiny_model_dir, monkeypatch):
    model, training_pass = _model_and_pass(tiny_model_dir)
    inspected, from_function = [], inspect._signature_from_function

    def counting(cls, function, *args, **kwargs):
        inspected.append(function.__qualname__)
        return from_function(cls, function, *args, **kwargs)

    monkeypatch.setattr(inspect, "_signature_from_function", counting)
    training_pass()
    assert inspected == []
    processor = next(m.processor for m in model.unet.modules() if hasattr(m, "processor"))
    assert list(inspect.signature(processor.__call__).parameters)[:2] == ["attn", "hidden_states"]  # the same one
