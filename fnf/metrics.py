"""Evaluation metrics as torchmetrics ``Metric`` objects (their states sum across DDP processes).

Preservation is measured between the tuned image I and the base image I0 of the same x_T, separately
outside the problem mask (should not change), inside it (may change) and over the whole image: PSNR, SSIM and
LPIPS.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

Region = Literal["outside", "inside", "all"]


def region_weights(mask: Tensor, region: Region) -> Tensor:
    """(B, 1, H, W) mask in [0, 1] (1 = may change) -> per-pixel weights of ``region``."""
    return {"outside": 1 - mask, "inside": mask, "all": torch.ones_like(mask)}[region]


class RegionMean(Metric, ABC):
    """Mean of a per-pixel map of (tuned, base) over one region of the mask, pooled over all images."""

    higher_is_better = True

    def __init__(self, region: Region = "outside", **kwargs) -> None:
        super().__init__(**kwargs)
        self.region = region
        self.add_state("weighted_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @abstractmethod
    def pixel_map(self, tuned: Tensor, base: Tensor) -> Tensor:
        """(B, C, H, W) per-pixel values of (tuned, base) whose region mean this metric reports."""

    def update(self, tuned: Tensor, base: Tensor, mask: Tensor) -> None:
        values = self.pixel_map(tuned.float(), base.float())
        weights = region_weights(mask, self.region)  # (B, 1, H, W), broadcast over channels
        self.weighted_sum += (weights * values).sum().double()
        self.weight += weights.sum().double() * values.shape[1]

    def region_mean(self) -> Tensor:
        """NaN when the region has no pixels (every mask empty: nothing inside): no number, not a made-up one."""
        return self.weighted_sum / self.weight if self.weight > 0 else torch.full((), math.nan, dtype=torch.float64)


class MaskedPSNR(RegionMean):
    """PSNR (data range 1) over the pixels of a region, pooled over all images like torchmetrics' PSNR."""

    def pixel_map(self, tuned: Tensor, base: Tensor) -> Tensor:
        return (tuned - base) ** 2

    def compute(self) -> Tensor:
        return (10 * torch.log10(1 / self.region_mean().clamp_min(1e-20))).float()  # identical: 200 dB, not inf


class MaskedSSIM(RegionMean):
    """Mean of the SSIM map (Gaussian window 11, σ 1.5) weighted by a region of the mask."""

    def pixel_map(self, tuned: Tensor, base: Tensor) -> Tensor:
        return structural_similarity_index_measure(tuned, base, data_range=1.0, return_full_image=True)[1]

    def compute(self) -> Tensor:
        return self.region_mean().float()


LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}  # LPIPS name -> torchvision's


def lpips_network(net: Literal["alex", "vgg", "squeeze"]) -> nn.Module:
    """torchmetrics' LPIPS network (Zhang et al. 2018) in its spatial form: (tuned, base) in [0, 1] -> a (B, 1, H, W)
    distance map. Linear layers: the LPIPS weights torchmetrics ships; backbone: torchvision's ImageNet weights,
    read from torch's hub cache (downloaded there once where online)."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips  # the class its LPIPS metric wraps, spatial here
    from torchvision.models import get_model_weights

    url = get_model_weights(LPIPS_BACKBONES[net]).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    try:
        return _NoTrainLpips(net=net, spatial=True)
    except OSError as error:  # offline and not cached (URLError), or an unreadable cache
        raise ValueError(f"lpips: {net} needs torchvision's ImageNet weights {cached} (from {url}; torch.hub "
                         f"downloads them there where online): {error}") from None


class MaskedLPIPS(RegionMean):
    """LPIPS (``lpips_network``) per pixel, averaged over a region: a distance, 0 = identical, lower is better.
    Near the mask's edge a pixel's value also sees changes across the edge (the layers' receptive fields). Images
    under ``MIN_SIDE`` pixels are upsampled by a whole factor first (AlexNet's pooling needs 32 at least)."""

    higher_is_better = False
    MIN_SIDE = 64

    def __init__(self, network: nn.Module, region: Region = "outside", **kwargs) -> None:
        super().__init__(region, **kwargs)
        self.network = network  # one network shared by every region's metric

    def pixel_map(self, tuned: Tensor, base: Tensor) -> Tensor:
        scale = math.ceil(self.MIN_SIDE / min(tuned.shape[-2:]))
        if scale > 1:  # (B, 3, H, W) -> (B, 3, sH, sW)
            tuned, base = (F.interpolate(x, scale_factor=scale, mode="bilinear") for x in (tuned, base))
        with torch.no_grad():
            distance = self.network(tuned, base, normalize=True)  # (B, 1, sH, sW): [0, 1] in, LPIPS' [-1, 1] inside
        return F.avg_pool2d(distance, scale) if scale > 1 else distance  # (B, 1, H, W)

    def compute(self) -> Tensor:
        return self.region_mean().float()


class CLIPScore(Metric):
    """CLIPScore (Hessel et al. 2021): mean of 100 · max(cos(image, prompt), 0), for any model with
    ``image_features(images)`` and ``text_features(prompts)`` returning unit vectors (e.g. ShapesAlignment,
    OpenCLIPAlignment)."""

    higher_is_better = True

    def __init__(self, clip: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip = clip.eval().requires_grad_(False)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: Tensor, prompts: list[str]) -> None:
        with torch.no_grad():
            cosine = (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)
        self.total += (100 * cosine.clamp_min(0)).sum().double()
        self.count += len(prompts)

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class ImageFeatures(nn.Module):
    """A CLIP-like model's image tower as a torchmetrics FID ``feature`` extractor (floats in [0, 1] in)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        with torch.no_grad():
            self.num_features = int(clip.image_features(torch.rand(1, 3, 32, 32)).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.clip.image_features(images.float(), normalize=False)
