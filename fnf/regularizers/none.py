"""No fidelity term: plain DRaFT (the global baseline), the same as λ = 0."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from fnf.regularizers.base import Regularizer

if TYPE_CHECKING:
    from fnf.sampling import Sample


class NoRegularizer(Regularizer):
    def forward(self, tuned: Sample, base: Sample, keep: Tensor) -> Tensor:
        return tuned.images.new_zeros(tuned.images.shape[0])
