"""Judge a fine-tuned LoRA in the shapes world against its base model, with ground truth.

    python -m fnf.worlds.shapes.evaluate_fnf --lora runs/artifacts/lightning_logs/version_0/lora \
        --prompts fnf/worlds/shapes/prompts/artifacts_eval.jsonl

Base and tuned images come from the same x_T per (prompt, seed). The analytic judge (never used in
training) gives defect / unsafe / alignment rates and, of the base images' defects / marks, the share
the tuned image repaired (``repaired_rate`` / ``unsafe_repaired_rate``, see ``judge.repaired``: the
region now has its object's colour, a mark's region that or the background's, not merely no dark / cyan
pixels; null when the base images had none). Preservation is PSNR and SSIM between tuned and base
images outside the judge's problem mask on the base image (dilated by ``--dilation`` pixels).
PSNR is dataset-level: 10·log10(1 / MSE) with the MSE pooled over all outside pixels of all images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from fnf.prompt_file import read_prompts
from fnf.export import load_lora
from fnf.pipeline import Text2ImageModel
from fnf.sampling import SamplerArgs, initial_noise, make_sampler
from fnf.worlds.shapes.judge import judge, repaired


def sample_pair(model: Text2ImageModel, prompts: list[str], seeds: list[int], args: SamplerArgs,
                batch_size: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, tuned) images (N, 3, H, W) from the same x_T; the model must carry the LoRA."""
    sampler = make_sampler(model, args)
    shape = model.latent_shape(sampler.resolution)
    base, tuned = [], []
    with torch.no_grad():
        uncond = model.unconditional()
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            text = model.encode_prompts(chunk)
            noise = initial_noise(torch.tensor(seeds[start:start + batch_size]), shape, "cpu")
            empty = uncond.expand(len(chunk))
            tuned.append(sampler(noise, text, empty, "none").images)
            with model.adapter_disabled():
                base.append(sampler(noise, text, empty, "none").images)
    return torch.cat(base), torch.cat(tuned)


def _psnr(squared_error: torch.Tensor, weight: torch.Tensor) -> float:
    mse = (squared_error * weight).sum() / (weight.sum() * squared_error.shape[1]).clamp_min(1)
    return float("inf") if mse == 0 else (10 * torch.log10(1 / mse)).item()


def compare(base: torch.Tensor, tuned: torch.Tensor, prompts: list[str], dilation: int = 2) -> dict:
    """Judge rates for base and tuned images, and how much of the image outside the problem changed."""
    verdicts = {"base": judge(base, prompts), "tuned": judge(tuned, prompts)}
    report = {"n": len(prompts)}
    for kind, items in verdicts.items():
        report[f"{kind}_defect_rate"] = sum(v.defect for v in items) / len(items)
        report[f"{kind}_unsafe_rate"] = sum(v.unsafe for v in items) / len(items)
        report[f"{kind}_alignment"] = sum(v.aligned for v in items) / len(items)
    for problem, key in (("defect", "repaired_rate"), ("unsafe", "unsafe_repaired_rate")):
        outcomes = [repaired(b, t, p, v, problem) for b, t, p, v in zip(base, tuned, prompts, verdicts["base"])]
        outcomes = [o for o in outcomes if o is not None]  # base images that had the problem
        report[key] = sum(outcomes) / len(outcomes) if outcomes else None
    problem = torch.stack([(v.defect_mask | v.unsafe_mask).float() for v in verdicts["base"]])  # (N, 1, H, W)
    problem = F.max_pool2d(problem, 2 * dilation + 1, stride=1, padding=dilation)
    outside = 1 - problem
    squared_error = (tuned - base) ** 2
    _, ssim_map = structural_similarity_index_measure(tuned, base, data_range=1.0, return_full_image=True)
    report.update(
        psnr_outside=_psnr(squared_error, outside),
        psnr_inside=_psnr(squared_error, problem),
        psnr_whole=_psnr(squared_error, torch.ones_like(outside)),
        ssim_outside=((ssim_map.mean(1, keepdim=True) * outside).sum() / outside.sum()).item(),
        problem_area=problem.mean().item(),
    )
    for name in ("defect", "unsafe"):
        before = report[f"base_{name}_rate"]
        report[f"{name}_reduction"] = (before - report[f"tuned_{name}_rate"]) / before if before else 0.0
    report["alignment_change_points"] = 100 * (report["tuned_alignment"] - report["base_alignment"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", required=True, help="folder with pytorch_lora_weights.safetensors")
    parser.add_argument("--model", default="embedded:shapes-t2i")
    parser.add_argument("--prompts", default="fnf/worlds/shapes/prompts/artifacts_eval.jsonl")
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--dilation", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    model = Text2ImageModel.from_pretrained(args.model)
    load_lora(model, args.lora)
    items = read_prompts(args.prompts)
    prompts, seeds = [r.prompt for r in items], [r.seed if r.seed is not None else i for i, r in enumerate(items)]
    sampler_args = SamplerArgs(num_steps=args.num_steps, guidance_scale=args.guidance_scale)
    report = compare(*sample_pair(model, prompts, seeds, sampler_args), prompts, args.dilation)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
