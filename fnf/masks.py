"""Where the base image I0 may change: heatmap or saliency -> threshold -> dilation -> mask M.

The paper thresholds and dilates a heatmap (RAHF) or a gradient-saliency map of a scalar classifier
(safety); thresholds, radius, feathering and the empty-mask rule are unreported there, so they are
all options here (``MaskArgs``). Masks are computed on I0 only and never carry gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

if TYPE_CHECKING:  # fnf.rewards.saliency imports this module
    from fnf.rewards.base import RewardHead


@dataclass
class MaskArgs:
    """Heatmap -> mask post-processing, shared by every reward head."""

    threshold: float = 0.5
    """A pixel is a problem where its heatmap (saliency: max-normalised) value is >= threshold."""
    dilation: int = 1
    """Dilation radius in pixels (square structuring element of side 2r+1) that relaxes the boundary."""
    kind: Literal["hard", "soft"] = "hard"
    """hard: a binary mask; soft: the binary mask with Gaussian-feathered edges (sigma = feather)."""
    feather: float = 1.0
    """Soft masks: Gaussian sigma in pixels of the feathered edge outside the hard mask."""
    saliency_sigma: float = 1.0
    """Saliency masks: Gaussian smoothing sigma in pixels of |d score / d image| before thresholding."""
    empty: Literal["keep", "skip", "global"] = "keep"
    """An image whose mask is empty: keep (paper formula: reward on, whole image preserved),
    skip (that head's reward off for the image: nothing to fix), global (whole image may change; in union mode only
    where no head found anything)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"model.masks.threshold must be in (0, 1], got {self.threshold}")
        if self.dilation < 0:
            raise ValueError(f"model.masks.dilation must be >= 0, got {self.dilation}")
        if not self.feather > 0:
            raise ValueError(f"model.masks.feather must be > 0, got {self.feather}")
        if not self.saliency_sigma >= 0:
            raise ValueError(f"model.masks.saliency_sigma must be >= 0, got {self.saliency_sigma}")


def heatmap_to_mask(heatmap: Tensor, args: MaskArgs) -> Tensor:
    """(B, 1, H, W) heatmap in [0, 1] -> (B, 1, H, W) mask in [0, 1] (1 = may change)."""
    mask = (heatmap >= args.threshold).to(heatmap.dtype)
    if args.dilation > 0:
        side = 2 * args.dilation + 1
        mask = F.max_pool2d(mask, side, stride=1, padding=args.dilation)
    if args.kind == "soft":
        mask = torch.maximum(mask, blur(mask, args.feather))
    return mask


def saliency_heatmap(head: RewardHead, images: Tensor, prompts: list[str], sigma: float) -> Tensor:
    """Gradient saliency |d score / d image|, max over channels, smoothed, max-normalised per image."""
    from fnf.rewards.base import head_label, scores_only  # here: fnf.rewards imports this module

    with torch.inference_mode(False), torch.enable_grad():  # Lightning validates/tests in inference mode
        pixels = images.detach().clone().requires_grad_(True)  # a normal tensor, even from an inference one
        with scores_only():
            score = head(pixels, prompts).score
        (grad,) = torch.autograd.grad(score.sum(), pixels, allow_unused=True) if score.grad_fn else (None,)
    if grad is None:  # images are scored independently: one backward gives every image's saliency
        raise ValueError(f"reward head {head_label(head)}: mask: saliency needs a score differentiable with respect to "
                         "the images; give the head a heatmap, or mask: none")
    saliency = grad.abs().amax(dim=1, keepdim=True)  # (B, 3, H, W) -> (B, 1, H, W)
    return peak_normalised(blur(saliency, sigma) if sigma > 0 else saliency)


def clear_clean_images(heatmap: Tensor, score: Tensor, clean_score: float | None) -> Tensor:
    """Zero the (B, 1, H, W) heatmap of every image whose (B,) score is >= clean_score (None: keep all).

    Saliency is peak-normalised, so without this absolute test every image, however good, has a
    region to change; with it, a clean image's mask is empty and ``MaskArgs.empty`` applies.
    """
    if clean_score is None:
        return heatmap
    clean = score.detach()[:, None, None, None] >= clean_score  # (B,) -> (B, 1, 1, 1); no host sync
    return torch.where(clean, torch.zeros_like(heatmap), heatmap)


def peak_normalised(heatmap: Tensor) -> Tensor:
    """(B, 1, H, W) non-negative map -> divided by its per-image maximum (all-zero maps stay zero)."""
    peak = heatmap.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, heatmap / peak.clamp_min(torch.finfo(heatmap.dtype).tiny), 0.0)


def blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur; the kernel is cut at 3σ, and at the image side for images smaller than that."""
    radius = max(1, min(round(3 * sigma), min(x.shape[-2:]) - 1))
    return gaussian_blur(x, kernel_size=2 * radius + 1, sigma=sigma)
