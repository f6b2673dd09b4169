import pytest
import torch

from fnf.rewards import ColorRegion, RewardOutput
from fnf.rewards.base import check_reward_output

IMAGES = torch.rand(2, 3, 8, 8)


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5, float("inf")])
def test_heatmap_values_outside_unit_interval_name_the_head(bad):
    heatmap = torch.rand(2, 1, 8, 8)
    heatmap[1, 0, 3, 4] = bad
    output = RewardOutput(score=torch.zeros(2), heatmap=heatmap)
    with pytest.raises(ValueError, match=r"ColorRegion: heatmap values must be finite and in \[0, 1\]"):
        check_reward_output(ColorRegion(), output, IMAGES)
    assert check_reward_output(ColorRegion(), output, IMAGES, values=False) is output  # shapes-only check


def test_heatmap_shape_is_checked_even_without_values():
    output = RewardOutput(score=torch.zeros(2), heatmap=torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"heatmap must have shape \(2, 1, 8, 8\)"):
        check_reward_output(ColorRegion(), output, IMAGES, values=False)


def test_a_valid_output_passes():
    head = ColorRegion()
    assert check_reward_output(head, head(IMAGES, ["a", "b"]), IMAGES).score.shape == (2,)
