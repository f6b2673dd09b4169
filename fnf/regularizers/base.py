"""The fidelity-term contract: how far the tuned sample strays from the base sample where it should not."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from fnf.sampling import Sample


class Regularizer(nn.Module, ABC):
    """Subclass it and name the subclass by ``class_path`` in YAML (``model.regularizer``)."""

    @abstractmethod
    def forward(self, tuned: Sample, base: Sample, keep: Tensor) -> Tensor:
        """tuned I, base I0 (constant), keep = 1 - M as (B, 1, H, W) in [0, 1] -> penalty per image (B,)."""
