"""Why does preservation saturate near 30 dB on shapes-flow (benchmarks/results/reproduce_flow_full.md)?

    python benchmarks/flow_preservation_probe.py k5 attn k20 train unet lam10 latent head head_only ...

One validation candidate of ``reproduce.py`` (flow_artifacts, λ = 1, threshold 0.5, dilation 2, heatmap, seed 0:
29.2 dB outside the judge mask) refit with one change each, through the same ``fit`` / ``evaluate`` on the 128
validation prompts: ``k5`` DRaFT-K with K = 5 instead of 2 (the fidelity gradient reaches more of the steps the
LoRA acts in); ``k20`` K = 20, every step (DRaFT's full backpropagation: does the gradient reaching all the steps
close the gap?); ``attn`` LoRA on the image stream's attention only (not the text stream nor the MLP). ``train``:
the candidate as is, evaluated on its 64 training items (the very prompts and x_T the fidelity term saw) as well
as on the validation prompts: is preservation a matter of generalising from 64 items? ``unet``: the same
candidate on shapes-t2i (``artifacts``), both splits, for comparison. ``lam10``: λ = 10 (does preservation follow
λ at all on this backbone?); ``latent``: the fidelity term on the latents (LatentFrobenius: each latent token
penalised directly) instead of the decoded pixels. ``head`` / ``head_only`` (K = 5, compare with ``k5``): the
remedy ``locality_probe.py`` suggested, an adapter whose change stays local: a small convolution head on the
sampler's guided velocity, Δv = conv1×1(SiLU(conv3×3(SiLU(conv3×3([x_t, v, σ]))))) with its last layer zero (the
tuned model starts as the base), trained with the LoRA (``head``) or instead of it (``head_only``). fnf does not
offer it: the probe patches it in (``LocalHead``). ``k5_lam3`` / ``k5_lam10`` (the LoRA at K = 5 with a higher λ)
and ``head_only_lam0.3`` place each route's trade-off; ``head_only_seed1``: ``head_only`` on seed 1;
``head_lora_lr0.1`` / ``head_lora_lr0.03``: the head beside a LoRA at a tenth / 3% of its learning rate, and
``k5_lr0.1`` their control, the LoRA at a tenth of its learning rate without the head; ``k5_lr0.3`` and
``unet_lr0.1`` (the UNet model, K = 2 as ``unet``) trace that learning-rate path; ``k5_lr0.1_lam0`` (global DRaFT
at that rate) and ``k5_lr0.1_300steps`` (3× the steps) ask what the fidelity term and more steps do along it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from torch import nn

import reproduce

CANDIDATE = reproduce.Settings(1.0, 0.5, 2, "heatmap")


def _scale_lr(config: dict, factor: float) -> None:
    config["model"]["optimizer"]["init_args"]["lr"] *= factor


def _as_is(config: dict) -> None:
    """No change to the config beyond the variant's settings."""


K5, BOTH = replace(CANDIDATE, k=5), ["train", "val"]  # K = 5 settings; both splits evaluated


VARIANTS = {  # name: (task, settings, config change, splits evaluated)
    "k5": ("flow_artifacts", K5, _as_is, BOTH),  # K: set by fit
    "k20": ("flow_artifacts", replace(CANDIDATE, k=20), _as_is, ["val"]),  # all 20 Euler steps
    "attn": ("flow_artifacts", CANDIDATE, lambda config: config["model"]["lora"].update(
        target_modules=["to_q", "to_k", "to_v", "to_out.0"]), ["val"]),
    "train": ("flow_artifacts", CANDIDATE, _as_is, BOTH),
    "unet": ("artifacts", CANDIDATE, _as_is, BOTH),
    "lam10": ("flow_artifacts", replace(CANDIDATE, lam=10.0), _as_is, BOTH),
    "latent": ("flow_artifacts", CANDIDATE, lambda config: config["model"].update(
        regularizer={"class_path": "LatentFrobenius"}), BOTH),
    "head": ("flow_artifacts", K5, _as_is, BOTH),
    "head_only": ("flow_artifacts", K5, _as_is, BOTH),
    # the trade-off each route offers at K = 5: the LoRA at a higher λ, the head alone at a lower one
    "k5_lam3": ("flow_artifacts", replace(K5, lam=3.0), _as_is, BOTH),
    "k5_lam10": ("flow_artifacts", replace(K5, lam=10.0), _as_is, BOTH),
    "head_only_lam0.3": ("flow_artifacts", replace(K5, lam=0.3), _as_is, BOTH),
    "head_only_seed1": ("flow_artifacts", K5, _as_is, BOTH),
    # the head beside a LoRA held back: the LoRA's learning rate × 0.1 / × 0.03, the head's as configured
    "head_lora_lr0.1": ("flow_artifacts", K5, _as_is, BOTH),
    "head_lora_lr0.03": ("flow_artifacts", K5, _as_is, BOTH),
    # their control: the LoRA at a tenth of its learning rate, no head
    "k5_lr0.1": ("flow_artifacts", K5, lambda config: _scale_lr(config, 0.1), BOTH),
    # the learning-rate path: a point between lr × 0.1 and × 1, and the UNet model's lr × 0.1 point (``unet``: × 1)
    "k5_lr0.3": ("flow_artifacts", K5, lambda config: _scale_lr(config, 0.3), BOTH),
    "unet_lr0.1": ("artifacts", CANDIDATE, lambda config: _scale_lr(config, 0.1), BOTH),
    # along that path: does the fidelity term still matter (λ = 0, global DRaFT), and where do 3x the steps go?
    "k5_lr0.1_lam0": ("flow_artifacts", replace(K5, lam=0.0), lambda config: _scale_lr(config, 0.1), BOTH),
    "k5_lr0.1_300steps": ("flow_artifacts", K5, lambda config: (
        _scale_lr(config, 0.1), config["trainer"].update(max_steps=300)), BOTH),
}
LORA_LR_SCALE = {"head_lora_lr0.1": 0.1, "head_lora_lr0.03": 0.03}
SEED = {"head_only_seed1": 1}
"""The run's seed (LoRA and head init, prompt order) where not 0: does a variant's result hold on another seed?"""
HEAD_WIDTH = 32


class LocalHead(nn.Module):
    """Δv from the 5 × 5 latent cells around each cell: x_t, the guided velocity v and σ; zero at the start."""

    def __init__(self, channels: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2 * channels + 1, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, channels, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, latents: torch.Tensor, sigma: float, velocity: torch.Tensor) -> torch.Tensor:
        sigmas = latents.new_full((len(latents), 1, *latents.shape[2:]), sigma)
        return self.net(torch.cat([latents, velocity, sigmas], 1))


@contextmanager
def local_head(train_lora: bool, lora_lr_scale: float = 1.0):
    """The flow sampler adds the head's Δv to every step's velocity, except in the base model's passes (the fused
    base pass is switched off by the fits of these variants); the optimiser gets the head (and the LoRA, at
    ``lora_lr_scale`` times the configured learning rate)."""
    from fnf.module import FocusNFix
    from fnf.sampling import FlowMatchSampler
    from fnf.sd3 import SD3Model

    shipped = SD3Model.add_lora, SD3Model.adapter_disabled, SD3Model.lora_parameters, FlowMatchSampler._update
    shipped_optimizers = FocusNFix.configure_optimizers

    def add_lora(self, args):
        shipped[0](self, args)
        self.local_head, self.head_on = LocalHead(self.transformer.config.in_channels), True

    @contextmanager
    def adapter_disabled(self):
        self.head_on = False
        try:
            with shipped[1](self):
                yield
        finally:
            self.head_on = True

    def lora_parameters(self):
        return (shipped[2](self) if train_lora else []) + list(self.local_head.parameters())

    def update(self, output, i, latents):
        if self.model.head_on:
            output = output + self.model.local_head(latents, self.sigmas[i], output)
        return shipped[3](self, output, i, latents)

    def configure_optimizers(self):
        lora = shipped[2](self.model) if train_lora else []
        optimizer = self.optimizer_factory([{"params": lora}, {"params": list(self.model.local_head.parameters())}])
        optimizer.param_groups[0]["lr"] *= lora_lr_scale
        return optimizer

    SD3Model.add_lora, SD3Model.adapter_disabled, SD3Model.lora_parameters = add_lora, adapter_disabled, lora_parameters
    FlowMatchSampler._update, FocusNFix.configure_optimizers = update, configure_optimizers
    try:
        yield
    finally:
        SD3Model.add_lora, SD3Model.adapter_disabled, SD3Model.lora_parameters, FlowMatchSampler._update = shipped
        FocusNFix.configure_optimizers = shipped_optimizers


KEYS = ("judge_defect_rate_base", "judge_defect_rate_tuned", "judge_alignment_base", "judge_alignment_tuned",
        "reference_outside_psnr", "reward_change/ShapesArtifact")


def main() -> None:
    shipped = reproduce.run_config
    for variant in sys.argv[1:] or list(VARIANTS):
        task, settings, change, splits = VARIANTS[variant]

        head = variant.startswith("head")

        def run_config(task, root, quick, seed, change=change, head=head):
            config = shipped(task, root, quick, seed)
            change(config)
            if head:
                config["model"]["sampler"]["fused_base"] = False  # the patched head knows no base rows
            return config

        reproduce.run_config = run_config
        patch = local_head(not variant.startswith("head_only"), LORA_LR_SCALE.get(variant, 1.0))
        with patch if head else nullcontext():
            run = reproduce.fit(task, settings, SEED.get(variant, 0), reproduce.ROOT / "runs" / "flow-probe" / variant,
                                False)
            for split in splits:
                metrics = reproduce.evaluate(task, run, split, False, SEED.get(variant, 0))
                print(variant, split, {key: round(metrics[key], 4) for key in KEYS if key in metrics}, flush=True)


if __name__ == "__main__":
    main()
