"""The fidelity-term contract: how far the tuned sample strays from the base sample where it should not."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from torch import Tensor, nn

from fnf.errors import named_component

if TYPE_CHECKING:  # annotations only: `fnf rewards` lists the classes without loading the sampler
    from fnf.sampling import Sample


class Regularizer(nn.Module, ABC):
    """Subclass it and name the subclass by ``class_path`` in YAML (``model.regularizer``)."""

    @abstractmethod
    def forward(self, tuned: Sample, base: Sample, keep: Tensor) -> Tensor:
        """tuned I, base I0 (constant), keep = 1 - M as (B, 1, H, W) in [0, 1] -> penalty per image (B,), >= 0."""

    def __call__(self, tuned: Sample, base: Sample, keep: Tensor) -> Tensor:
        """``forward``, its shape held to the contract (a scalar would be averaged without a word); every image's
        penalty is checked (finite, >= 0) with the step's one sync over its values (``fnf.nonfinite``)."""
        with named_component(f"regularizer {type(self).__name__}"):  # its errors' one line names it
            penalty = super().__call__(tuned, base, keep)
        if not isinstance(penalty, Tensor) or penalty.shape != keep.shape[:1]:
            got = tuple(penalty.shape) if isinstance(penalty, Tensor) else type(penalty).__name__
            raise ValueError(f"regularizer {type(self).__name__}: forward must return one penalty per image, shape "
                             f"({keep.shape[0]},), got {got}")
        return penalty
