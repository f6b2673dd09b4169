"""The paper's regional constraint on decoded pixels (RGB in [0, 1])."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fnf.regularizers.base import Regularizer

if TYPE_CHECKING:
    from fnf.sampling import Sample


class PixelFrobenius(Regularizer):
    """‖(1 − M) ⊙ (I − I0)‖_F per image, unsquared as in the paper (Fig. 2): a constant-magnitude pull
    back to I0 rather than a quadratic spring. Its (sub)gradient at I == I0 is zero, not NaN. In float32 whatever
    the images' dtype: a bf16 norm over 3·H·W pixels rounds the penalty and its gradient."""

    def forward(self, tuned: Sample, base: Sample, keep: Tensor) -> Tensor:
        outside = keep.float() * (tuned.images.float() - base.images.float())  # (B, 3, H, W)
        return torch.linalg.vector_norm(outside.flatten(1), dim=1)
