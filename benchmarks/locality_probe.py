"""Is the flow backbone's weaker preservation its own non-locality? Measured on the two base models, no training.

    python benchmarks/locality_probe.py [unet flow flow+patch] [--items 32]

On the first ``--items`` validation prompts (``artifacts_val.jsonl``) whose base image I0 has a defect, for
shapes-t2i (``configs/artifacts.yaml``) and shapes-flow (``configs/flow_artifacts.yaml``), both with K = 2 and
the configs' sampler otherwise; M is the judge's problem mask on I0 (defect pixels dilated 2 px: the pixels
``reference_*`` preservation is measured outside). Four changes of one image each (batch 1, so no other
prompt's gradient moves it), each reported as the RMS change of I outside M over the RMS change inside M
(1 = no preference for the defect; lower = more local) and, for the LoRA steps, as the RMS change outside M per
unit of reward gained (a step that lowers the reward gives a negative value: the medians are robust to the few
such items, the means in brackets are not); for (1) also outside the 4 × 4-pixel blocks touching M
(shapes-flow's tokens) over inside M: how much of the spread is the token's granularity.

1. ``reward step``: the LoRA (at its initialisation, so I = I0) moved by ε along the gradient of the training
   reward (ShapesArtifact) through the last K steps, as a DRaFT-K step with λ = 0 would move it; I resampled
   from the same x_T. The change the reward asks for, before any fidelity term.
2. ``random LoRA step``: the LoRA moved by ε along a random direction of the same norm (control: how any weight
   change spreads on this backbone).
3. ``reward of M's pixels step``: as (1), with the reward of M ⊙ I + (1 − M) ⊙ I0: its gradient asks for changes
   inside M only (would a reward that cannot see outside M spread less?).
4. ``latent nudge``: no LoRA change; at the first of the last K steps, Gaussian noise added to the latent cells
   under M only, then the K steps and the decoder. The sampler's own spatial coupling.

A second table repeats (1) with the gradient through one group of the configs' LoRA targets only (attention vs
convolutions or MLP, block by block): which targets fix locally?

If preservation is lower on the flow backbone because its joint attention spreads what the reward changes, the
flow model's ratio for (1) is well above the UNet's; if (4) is also above it, the spread is the sampler's own.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from argparse import ArgumentError
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from provenance import provenance

from fnf.cli import FnfCLI
from fnf.data import PromptDataModule
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.module import FocusNFix
from fnf.sampling import initial_noise
from fnf.worlds.shapes.judge import JudgeProblemMask

ROOT = Path(__file__).resolve().parents[1]
FLOW_GROUPS = {"image-stream attention q/k/v": r"\.attn\.to_[qkv]\.", "image-stream attention out": r"\.attn\.to_out\.",
               "text-stream attention": r"\.attn\.(add_[qkv]_proj|to_add_out)\.", "image MLP": r"\.ff\.",
               **{f"block {i}": rf"^transformer_blocks\.{i}\." for i in range(4)}}
FLOW_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2"]  # configs/flow_artifacts.yaml's
BACKBONES = {  # name: (label, config, extra arguments, {group of its LoRA targets: pattern of their parameter names})
    "unet": ("UNet (shapes-t2i)", "configs/artifacts.yaml", [],
             {"attention q/k/v": r"\.to_[qkv]\.", "attention out": r"\.to_out\.",
              "ResNet convs (conv1/2)": r"\.conv[12]\.", "down blocks": r"^down_blocks\.",
              "mid block": r"^mid_block\.", "up blocks": r"^up_blocks\."}),
    "flow": ("flow (shapes-flow)", "configs/flow_artifacts.yaml", [], FLOW_GROUPS),
    "flow+patch": ("flow (shapes-flow), LoRA also on the patch embedding and the final projection",
                   "configs/flow_artifacts.yaml",
                   ["--model.lora.target_modules", json.dumps([*FLOW_TARGETS, "pos_embed.proj", "proj_out"])],
                   {**FLOW_GROUPS, "patch embedding (conv)": r"^pos_embed\.proj\.",
                    "final projection": r"^proj_out\."}),
}
PROMPTS = ROOT / "fnf" / "worlds" / "shapes" / "prompts" / "artifacts_val.jsonl"
JUDGE_MASK = MaskArgs(threshold=0.5, dilation=2)  # the configs' Evaluation(reference=...)
MASKED = "reward of M's pixels step"
TOKEN_PIXELS = 4  # shapes-flow's token: a 2×2 patch of latent cells, each 2×2 pixels
EPSILON = 1e-2  # LoRA step length (the LoRA's B starts at 0); small enough to stay in the linear regime


class ProbeCLI(FnfCLI):
    """``fnf fit``'s parser and model construction; nothing runs."""

    def parse_arguments(self, parser, args: list[str]) -> None:
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as error:
            raise ValueError(str(error)) from None


def build(config: str, extra: list[str]) -> FocusNFix:
    cli = ProbeCLI(FocusNFix, PromptDataModule, args=["--config", str(ROOT / config), "--model.sampler.k", "2", *extra],
                   run=False, parser_kwargs={"parser_mode": "omegaconf"})
    return cli.model.eval()


def rms_outside_inside(change: Tensor, mask: Tensor) -> tuple[float, float]:
    """(RMS of ``change`` outside ``mask``, inside it) over pixels and channels."""
    squared = change.pow(2).mean(1, keepdim=True)
    outside = (squared * (1 - mask)).sum() / (1 - mask).sum()
    inside = (squared * mask).sum() / mask.sum()
    return outside.sqrt().item(), inside.sqrt().item()


def _gradient(value: Tensor, parameters: list[Tensor], retain: bool = False) -> list[Tensor]:
    gradient = torch.autograd.grad(value, parameters, allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, gradient)]


def probe_item(model: FocusNFix, prompt: str, seed: int, groups: dict[str, str]) -> dict | None:
    sampler, head = model.sampler, model.heads[0]
    text, uncond = model._encode([prompt])
    noise = initial_noise([seed], model.latent_shape, model.device)
    start = sampler._no_grad_steps("last_k")
    with torch.no_grad(), model.model.adapter_disabled():
        latents = sampler._denoise(noise, sampler._guided(text, uncond), 0, start)  # x at the first grad step
        base = sampler._finish(latents, start, text, uncond, "none").images
    mask = heatmap_to_mask(JudgeProblemMask()(base, [prompt]).heatmap, JUDGE_MASK)
    if mask.sum() == 0:
        return None
    token_mask = F.interpolate(F.max_pool2d(mask, TOKEN_PIXELS), scale_factor=TOKEN_PIXELS)  # blocks touching M
    with torch.no_grad():
        base_reward = head(base, [prompt]).score.item()
    names, lora = zip(*[(n, p) for n, p in model.model.denoiser.named_parameters() if p.requires_grad])
    tuned = sampler(noise, text, uncond, "last_k").images
    reward = head(tuned, [prompt]).score.sum()
    inside_only = head(mask * tuned + (1 - mask) * base, [prompt]).score.sum()  # the reward sees M's pixels only
    directions = {"reward step": _gradient(reward, lora, retain=True),
                  "reward of M's pixels step": _gradient(inside_only, lora)}
    for group, pattern in groups.items():  # the reward step through one group of LoRA targets only
        directions[group] = [g * bool(re.search(pattern, n)) for n, g in zip(names, directions["reward step"])]
    generator = torch.Generator().manual_seed(seed)
    directions["random LoRA step"] = [torch.randn(p.shape, generator=generator) * (g != 0)  # the same tensors
                                      for p, g in zip(lora, directions["reward step"])]
    row = {}
    for name, direction in directions.items():
        scale = EPSILON / torch.sqrt(sum(d.pow(2).sum() for d in direction)).item()
        with torch.no_grad():
            for p, d in zip(lora, direction):
                p.add_(d, alpha=scale)
            moved = sampler(noise, text, uncond, "none").images
            gained = head(moved, [prompt]).score.item() - base_reward
            for p, d in zip(lora, direction):
                p.sub_(d, alpha=scale)
        outside, inside = rms_outside_inside(moved - base, mask)
        beyond_tokens, _ = rms_outside_inside(moved - base, token_mask)
        row[name] = (outside / inside, outside / gained, beyond_tokens / inside)
    latent_mask = torch.nn.functional.adaptive_max_pool2d(mask, latents.shape[-2:])  # a cell touching M
    nudge = torch.randn(latents.shape, generator=generator).to(latents) * latent_mask * 0.1
    with torch.no_grad(), model.model.adapter_disabled():
        nudged = sampler._finish(latents + nudge, start, text, uncond, "none").images
    outside, inside = rms_outside_inside(nudged - base, mask)
    row["latent nudge"] = (outside / inside, None, None)
    row["mask area"] = mask.mean().item()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="*", choices=list(BACKBONES), default=[], help="default: all")
    parser.add_argument("--items", type=int, default=32, help="validation items with a defect, per backbone")
    args = parser.parse_args()
    print(f"# {provenance()}")
    command = f"python benchmarks/locality_probe.py {' '.join(args.backbones or BACKBONES)} --items {args.items}"
    print(f"# `{command}`; ε = {EPSILON}, K = 2, judge mask threshold {JUDGE_MASK.threshold}, dilation "
          f"{JUDGE_MASK.dilation} px; median over items (mean)\n")
    print("| backbone | items | mask area | reward step: RMS out / in | reward step: RMS out per reward gained "
          "| reward step: RMS beyond the 4-px blocks touching M / in "
          "| reward of M's pixels step: RMS out / in | reward of M's pixels step: RMS out per reward gained "
          "| random LoRA step: RMS out / in | latent nudge: RMS out / in |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    items = PromptDataModule(train_file=str(PROMPTS)).load(str(PROMPTS))
    by_group = []
    for backbone, config, extra, groups in (BACKBONES[name] for name in args.backbones or BACKBONES):
        torch.manual_seed(0)  # the LoRA's initialisation
        model = build(config, extra)
        rows = []
        for item in items:
            row = probe_item(model, item["prompt"], item["seed"], groups)
            if row is not None:
                rows.append(row)
            if len(rows) == args.items:
                break

        def cell(name: str, part: int) -> str:
            values = [row[name][part] for row in rows]
            return f"{statistics.median(values):.3f} ({statistics.fmean(values):.3f})"

        area = statistics.fmean(row["mask area"] for row in rows)
        print(f"| {backbone} | {len(rows)} | {100 * area:.1f}% | {cell('reward step', 0)} | {cell('reward step', 1)} "
              f"| {cell('reward step', 2)} "
              f"| {cell(MASKED, 0)} | {cell(MASKED, 1)} | {cell('random LoRA step', 0)} "
              f"| {cell('latent nudge', 0)} |", flush=True)
        by_group.extend(f"| {backbone} | {group} | {cell(group, 0)} | {cell(group, 1)} |" for group in groups)
    print("\nThe reward step through one group of the configs' LoRA targets only (the others' gradient zeroed):\n")
    print("| backbone | LoRA group | RMS out / in | RMS out per reward gained |\n|---|---|---|---|")
    print("\n".join(by_group))


if __name__ == "__main__":
    main()
