"""Saliency: a scalar reward head becomes a heatmap head (gradient saliency or Grad-CAM)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fnf.rewards import ColorRegion, RewardHead, RewardOutput
from fnf.rewards.base import check_reward_output
from fnf.rewards.saliency import Saliency


class RednessInBox(RewardHead):
    """Scalar score: mean redness (a 1×1 conv) in the top-left quarter; no heatmap of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))

    def forward(self, images, prompts):
        side = images.shape[-1] // 2
        return RewardOutput(score=self.features(images)[..., :side, :side].mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("method, layer", [("gradient", None), ("gradcam", "features")])
def test_heatmap_follows_what_drives_the_score(method, layer):
    images = torch.zeros(2, 3, 16, 16)
    images[:, 0, :8, :8] = 1.0  # red in the scored box
    images[:, 2, 8:, 8:] = 1.0  # blue elsewhere: the score never looks there
    head = Saliency(RednessInBox(), method=method, layer=layer, sigma=0.0)
    with torch.inference_mode():  # as in Lightning's validate / test
        out = check_reward_output(head, head(images, ["", ""]), images)
    torch.testing.assert_close(out.score, RednessInBox()(images, ["", ""]).score)
    assert out.heatmap[..., :8, :8].mean() > 0.5 and out.heatmap[..., 8:, 8:].max() == 0
    assert head.name == f"RednessInBox+{method}"


def test_wrapping_a_heatmap_head_replaces_its_heatmap():
    images = torch.rand(1, 3, 16, 16)
    out = Saliency(ColorRegion(box=(0.0, 0.0, 0.5, 0.5)), sigma=0.0)(images, [""])
    assert out.heatmap[..., 8:, :].max() == 0 and out.heatmap.max() == 1


def test_gradcam_needs_a_layer_of_the_head():
    with pytest.raises(ValueError, match="Saliency.layer: 'nope' is not a module of RednessInBox"):
        Saliency(RednessInBox(), method="gradcam", layer="nope")
