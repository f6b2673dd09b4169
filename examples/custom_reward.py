"""A new reward head in a few lines: "make the sky (top third) blue", with a heatmap of where it is not.

Select it from YAML by class_path (the folder holding ``examples`` must be importable, e.g. the repo root):

    model:
      rewards:
        - head:
            class_path: examples.custom_reward.BlueSky
            init_args: {fraction: 0.33}
          mask: heatmap
"""

import torch

from fnf.rewards import RewardHead, RewardOutput


class BlueSky(RewardHead):
    """score = −mean distance to pure blue over the top ``fraction`` of the image (higher is better)."""

    gives_heatmap = "yes"  # for `fnf rewards` and check_head

    def __init__(self, fraction: float = 0.33) -> None:
        super().__init__()
        self.fraction = fraction

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        blue = images.new_tensor([0.0, 0.0, 1.0])[:, None, None]
        distance = ((images - blue) ** 2).mean(1, keepdim=True)  # (B, 1, H, W), 1 at yellow
        sky = torch.zeros_like(distance)
        sky[..., : max(1, round(self.fraction * images.shape[-2])), :] = 1
        score = -(distance * sky).sum((1, 2, 3)) / sky.sum((1, 2, 3))
        return RewardOutput(score=score, heatmap=distance * sky)  # heatmap: high where the sky is not blue
