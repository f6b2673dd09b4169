"""The regional constraint on latents: no VAE decode needed for the penalty, for latent models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from fnf.regularizers.base import Regularizer

if TYPE_CHECKING:
    from fnf.sampling import Sample


class LatentFrobenius(Regularizer):
    """‖(1 − M↓) ⊙ (z − z0)‖_F per image, with the keep-mask area-resized to the latent grid; in float32, as
    PixelFrobenius."""

    def forward(self, tuned: Sample, base: Sample, keep: Tensor) -> Tensor:
        keep = F.interpolate(keep.float(), size=tuned.latents.shape[-2:], mode="area")  # (B, 1, H, W) -> (B, 1, h, w)
        outside = keep * (tuned.latents.float() - base.latents.float())
        return torch.linalg.vector_norm(outside.flatten(1), dim=1)
