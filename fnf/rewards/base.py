"""The reward-head contract every head follows.

A head maps decoded images (RGB in [0, 1], shape (B, 3, H, W), at the generator's resolution) and
their prompts to a differentiable score per image (higher is better) and, optionally, a heatmap of
"where it is wrong" in [0, 1]. Heads without a heatmap are localised by gradient saliency of their
score (``fnf.masks.saliency``), which is how the paper masks scalar safety classifiers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from fnf.errors import named_component

WEIGHTS_HOWTO = ("put its path in a second --config as docs/real-models.md shows: reward heads and the Evaluation "
                 "callback's clip are list items the command line cannot set")
"""Where a head's missing weights file is set: said by every head's error about it."""

_heatmaps_wanted = ContextVar("fnf_heatmaps_wanted", default=True)


@contextmanager
def scores_only() -> Iterator[None]:
    """Head calls inside use the scores only (the tuned pass, saliency's gradient): a head whose heatmap costs
    extra work may skip it when ``heatmap_wanted()`` is False (``Saliency`` does: a gradient pass per call)."""
    token = _heatmaps_wanted.set(False)
    try:
        yield
    finally:
        _heatmaps_wanted.reset(token)


def heatmap_wanted() -> bool:
    return _heatmaps_wanted.get()


_float32 = ContextVar("fnf_float32_rewards", default=False)


@contextmanager
def float32_rewards() -> Iterator[None]:
    """Head calls inside run in float32 with autocast off, whatever the trainer's precision: the rewards validation
    and test report (under bf16-mixed a CLIP score's change between base and tuned images is below bf16's step)."""
    token = _float32.set(True)
    try:
        yield
    finally:
        _float32.reset(token)


@dataclass
class RewardOutput:
    score: Tensor
    """(B,) higher is better; differentiable w.r.t. the input images."""
    heatmap: Tensor | None = None
    """(B, 1, H, W) in [0, 1], high where the image is wrong; None -> saliency of ``score``."""


class RewardHead(nn.Module, ABC):
    """Base class of all reward heads: subclass it and name the subclass by ``class_path`` in YAML.

    Heads are frozen by the trainer (``requires_grad_(False)``, eval mode) but must stay
    differentiable w.r.t. ``images``; resize and normalise inside ``forward``.
    """

    gives_heatmap: ClassVar[Literal["yes", "no", "optional", "undeclared"]] = "undeclared"
    """For ``fnf rewards``: whether ``forward`` returns a heatmap (optional: a constructor argument decides);
    heads without one are localised with ``mask: saliency`` or wrapped in ``fnf.rewards.Saliency``."""

    run_name: str | None = None
    """This run's name for the head, ``model.rewards[i].name`` (set by its RewardTerm); None: ``name``."""

    @property
    def name(self) -> str:
        """Short name used in logs, metrics, masks, scans and error messages (the class name unless overridden;
        two heads of one run need two names)."""
        return type(self).__name__

    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        with named_component(f"reward head {head_label(self)}"):  # its errors' one line names it
            if not _float32.get():
                return super().__call__(images, prompts)
            with torch.autocast(images.device.type, enabled=False):
                return super().__call__(images.float(), prompts)

    @abstractmethod
    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput: ...


def head_label(head: RewardHead) -> str:
    """The head's name in this run: ``model.rewards[i].name`` when the config gives one, else the head's own."""
    return head.run_name or head.name


def check_reward_output(head: RewardHead, output: RewardOutput, images: Tensor, values: bool = True,
                        trained_on: bool = False) -> RewardOutput:
    """Raise one clear error naming the head when its output breaks the contract.

    ``values=False`` checks shapes only (no device sync): for the tuned pass, whose heatmap is unused.
    ``trained_on``: the loss backpropagates through this score (a weight > 0), so when the images carry gradients
    the score must too; otherwise the LoRA would silently get no gradient from it.
    """
    batch, _, height, width = images.shape
    who = f"reward head {head_label(head)}"
    if not isinstance(output, RewardOutput):
        raise ValueError(f"{who}: forward must return RewardOutput, got {type(output).__name__}")
    for key, value in (("score", output.score), ("heatmap", output.heatmap)):
        if value is not None and not (isinstance(value, Tensor) and value.is_floating_point()
                                      and value.device == images.device):
            got = f"{value.dtype} on {value.device}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{who}: {key} must be a floating-point tensor on the images' device "
                             f"({images.device}), got {got}")
    if output.score.shape != (batch,):
        raise ValueError(f"{who}: score must have shape ({batch},), got {tuple(output.score.shape)}")
    if trained_on and images.requires_grad and output.score.grad_fn is None:  # detached, or a constant leaf
        raise ValueError(f"{who}: score has no gradient with respect to the images (detached, "
                         "computed under no_grad or not from the pixels); training needs a differentiable score, "
                         "or give the head weight 0 to use it for masks only")
    if output.heatmap is not None:
        heatmap = output.heatmap
        if heatmap.shape != (batch, 1, height, width):
            raise ValueError(
                f"{who}: heatmap must have shape ({batch}, 1, {height}, {width}), "
                f"got {tuple(heatmap.shape)}"
            )
        if values and not ((heatmap >= 0) & (heatmap <= 1)).all():  # NaN fails both comparisons
            raise ValueError(f"{who}: heatmap values must be finite and in [0, 1], got "
                             f"[{float(heatmap.detach().min()):.4g}, {float(heatmap.detach().max()):.4g}]")
    return output
