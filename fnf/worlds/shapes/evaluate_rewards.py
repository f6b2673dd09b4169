"""Measure the shapes-world reward heads against ground truth (the numbers in REWARDS_CARD.md).

    python -m fnf.worlds.shapes.train_rewards --eval-only     # runs ``evaluate`` on the shipped heads
    python -m fnf.worlds.shapes.evaluate_rewards              # the heads on shapes-t2i samples vs the judge

Heatmap IoU / pixel AUC and score AUC on fresh generator images (clean and degraded as in training),
saliency localisation of ShapesSafety, alignment accuracy against perturbed prompts, and speed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import Tensor

from fnf.masks import saliency_heatmap
from fnf.rewards.shapes import ShapesAlignment, ShapesArtifact, ShapesSafety
from fnf.worlds.shapes.generator import make_batch
from fnf.worlds.shapes.train_rewards import blur_matrices, degrade, perturb_prompt


def auc(positive: Tensor, negative: Tensor) -> float:
    """Probability that a random positive outranks a random negative (Mann-Whitney U)."""
    ranks = rankdata(torch.cat([positive, negative]).double().numpy())
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def iou(prediction: Tensor, target: Tensor) -> Tensor:
    """(B, 1, H, W) binary maps -> (B,) intersection over union."""
    inter = (prediction * target).sum(dim=(1, 2, 3))
    union = ((prediction + target) > 0).float().sum(dim=(1, 2, 3))
    return inter / union.clamp_min(1)


def conditions(images: Tensor, seed: int) -> dict[str, Tensor]:
    """The image conditions every metric is reported on: as rendered, randomly degraded like the
    training images, and the strongest training blur and noise (sigma 1, std 0.05)."""
    m = blur_matrices(torch.ones(len(images)), images.shape[-1])[:, None]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return {"rendered": images, "degraded": degrade(images, torch.Generator().manual_seed(seed)),
            "blur1+noise0.05": (m @ images @ m.transpose(-1, -2) + 0.05 * noise).clamp(0, 1)}


def heatmap_stats(output, masks: Tensor, positive: Tensor) -> dict:
    """Heatmap IoU / pixel AUC / false alarms and score AUC of one head's output against (masks, labels)."""
    hard = (output.heatmap >= 0.5).float()
    return {
        "iou@0.5": iou(hard[positive], masks[positive]).mean().item(),
        "pixel_auc": auc(output.heatmap[masks > 0], output.heatmap[masks == 0]),
        "score_auc": auc(output.score[~positive], output.score[positive]),  # clean should score higher
        "false_alarm_images": hard[~positive].amax(dim=(1, 2, 3)).mean().item(),
        "score_clean_mean": output.score[~positive].mean().item(),
        "score_bad_mean": output.score[positive].mean().item(),
    }


def evaluate_heatmap(head: ShapesArtifact | ShapesSafety, data: dict, key: str, seed: int) -> dict:
    """``heatmap_stats`` per image condition of generator images."""
    result = {}
    for name, images in conditions(data["images"], seed).items():
        with torch.no_grad():
            result[name] = heatmap_stats(head(images, data["prompts"]), data[f"{key}_masks"], data[key])
    return result


def evaluate_on_model_samples(out: Path, model: str = "embedded:shapes-t2i", n: int = 200) -> dict:
    """The heads on the text-to-image model's own samples (what fine-tuning feeds them), against the judge's
    defect / mark masks and verdicts: artifact prompts for ShapesArtifact, tempting prompts for ShapesSafety."""
    from fnf.pipeline import Text2ImageModel
    from fnf.sampling import DDIMSampler, SamplerArgs
    from fnf.worlds.shapes.evaluate_t2i import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample
    from fnf.worlds.shapes.generator import artifact_prompts, tempting_prompts
    from fnf.worlds.shapes.judge import judge

    t2i = Text2ImageModel.from_pretrained(model)
    sampler = DDIMSampler(t2i, SamplerArgs(num_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE))
    result = {}
    for name, head, pairs, key in (
            ("artifact", ShapesArtifact(str(out / "shapes-artifact.safetensors")), artifact_prompts(n, seed=2), "defect"),
            ("safety", ShapesSafety(str(out / "shapes-safety.safetensors")), tempting_prompts(n, seed=4), "unsafe")):
        images, prompts = sample(t2i, sampler, pairs), [p for p, _ in pairs]
        verdicts = judge(images, prompts)
        masks = torch.stack([getattr(v, f"{key}_mask") for v in verdicts]).float()  # (n, 1, H, W)
        positive = torch.tensor([getattr(v, key) for v in verdicts])
        with torch.no_grad():
            result[name] = {"n": n, f"judged_{key}": int(positive.sum()),
                            **heatmap_stats(head.requires_grad_(False)(images, prompts), masks, positive)}
    return result


def evaluate_saliency(head: ShapesSafety, data: dict, seed: int) -> dict:
    """How well |d score / d image| (the heatmap="none" path) localises the mark on unsafe images."""
    positive = data["unsafe"]
    masks = data["unsafe_masks"][positive]
    prompts = [p for p, u in zip(data["prompts"], positive.tolist()) if u]
    result = {}
    for name, images in conditions(data["images"][positive], seed).items():
        saliency = saliency_heatmap(head, images, prompts, sigma=1.0)  # the trainer's default smoothing
        peak = saliency.flatten(1).argmax(dim=1)
        near = F.max_pool2d(masks, 3, stride=1, padding=1).flatten(1)  # GT mask grown by 1 px
        result[name] = {
            "pointing_game": near.gather(1, peak[:, None]).mean().item(),
            "iou@0.5": iou((saliency >= 0.5).float(), masks).mean().item(),
            "mass_in_mask+1px": ((saliency.flatten(1) * near).sum(1) / saliency.flatten(1).sum(1)).mean().item(),
        }
    return result


def evaluate_alignment(head: ShapesAlignment, seed: int, n: int = 600) -> dict:
    """Pairwise accuracy (true prompt beats a one-change prompt) and in-batch top-1 retrieval."""
    result = {}
    for split in ("train", "heldout"):
        data = make_batch(n, seed=seed, defect_rate=0.15, unsafe_rate=0.5, split=split)
        rng = np.random.default_rng(seed)
        for name, images in conditions(data["images"], seed).items():
            with torch.no_grad():
                image = head.image_features(images)
                text = head.text_features(data["prompts"])
                true = head.scale * (image * text).sum(-1)
                stats = {}
                for kind in ("colour", "shape", "position", "any"):
                    wrong = [perturb_prompt(p, rng, None if kind == "any" else kind) for p in data["prompts"]]
                    stats[f"pairwise_{kind}"] = (true > head(images, wrong).score).float().mean().item()
                hits = []  # retrieving another image's identical prompt counts as a hit
                for i in range(0, n, 100):
                    best = (image[i:i + 100] @ text[i:i + 100].T).argmax(1).tolist()
                    hits += [data["prompts"][i + j] == data["prompts"][i + k] for k, j in enumerate(best)]
                stats["top1_in_100"] = float(np.mean(hits))
            result[f"{split}/{name}"] = stats
    return result


def speed_ms(head: torch.nn.Module, repeats: int = 20) -> float:
    """Median wall time (ms) of forward + backward to the images, batch 8 at 32x32."""
    data = make_batch(8, seed=0, split=None)
    times = []
    for _ in range(repeats + 3):
        images = data["images"].clone().requires_grad_(True)
        start = time.perf_counter()
        head(images, data["prompts"]).score.sum().backward()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[3:]))


def evaluate(out: Path, seed: int = 20_000) -> dict:
    """All reported numbers for the heads stored in ``out``."""
    artifact = ShapesArtifact(str(out / "shapes-artifact.safetensors")).requires_grad_(False)
    safety = ShapesSafety(str(out / "shapes-safety.safetensors")).requires_grad_(False)
    alignment = ShapesAlignment(str(out / "shapes-alignment")).requires_grad_(False)
    data = make_batch(1000, seed=seed, defect_rate=0.5, unsafe_rate=1.0, split=None)
    files = [out / "shapes-artifact.safetensors", out / "shapes-safety.safetensors",
             *sorted((out / "shapes-alignment").iterdir())]
    sizes = {p.name: p.stat().st_size for p in files}
    return {
        "test_images": {"n": 1000, "defect": int(data["defect"].sum()), "unsafe": int(data["unsafe"].sum())},
        "artifact": evaluate_heatmap(artifact, data, "defect", seed),
        "safety": evaluate_heatmap(safety, data, "unsafe", seed),
        "safety_saliency": evaluate_saliency(ShapesSafety(str(out / "shapes-safety.safetensors"), heatmap="none")
                                             .requires_grad_(False), data, seed),
        "alignment": evaluate_alignment(alignment, seed + 1),
        "forward_backward_ms_batch8": {h.name: speed_ms(h) for h in (artifact, safety, alignment)},
        "bytes": sizes,
        "total_bytes": sum(sizes.values()),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(evaluate_on_model_samples(Path(__file__).parent / "weights"), indent=1))
