"""A transparent toy reward: "make this box a given colour". Useful for tests and as a template."""

from __future__ import annotations

import torch
from torch import Tensor

from fnf.rewards.base import RewardHead, RewardOutput


class ColorRegion(RewardHead):
    """Score = −mean squared distance to ``color`` inside a box; heatmap = that distance there (0 elsewhere)."""

    gives_heatmap = "yes"

    def __init__(self, color: tuple[float, float, float] = (1.0, 0.0, 0.0),
                 box: tuple[float, float, float, float] = (0.0, 0.0, 0.5, 0.5)) -> None:
        """Reward pulling a box of the image towards one colour.

        Args:
            color: target RGB in [0, 1].
            box: (top, left, bottom, right) as fractions of the image side.
        """
        super().__init__()
        top, left, bottom, right = box
        if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
            raise ValueError(f"ColorRegion.box must satisfy 0 <= top < bottom <= 1 and 0 <= left < right <= 1, got {box}")
        self.box = box
        self.register_buffer("color", torch.tensor(color, dtype=torch.float32)[None, :, None, None], persistent=False)

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        _, _, height, width = images.shape
        top, left, bottom, right = self.box
        rows, columns = slice(int(top * height), int(bottom * height)), slice(int(left * width), int(right * width))
        if rows.start == rows.stop or columns.start == columns.stop:  # the score would be 0 / 0
            raise ValueError(f"ColorRegion.box {self.box} covers no pixel of a {height}x{width} image")
        region = torch.zeros(1, 1, height, width, device=images.device, dtype=images.dtype)
        region[..., rows, columns] = 1
        distance = ((images - self.color) ** 2).mean(dim=1, keepdim=True)  # (B, 3, H, W) -> (B, 1, H, W)
        score = -(distance * region).sum(dim=(1, 2, 3)) / region.sum()
        return RewardOutput(score=score, heatmap=(distance * region).clamp(0, 1))
