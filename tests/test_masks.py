"""Heatmap/saliency -> mask: threshold, dilation, feathering; saliency follows the reward's region."""

from __future__ import annotations

import pytest
import torch

from fnf.masks import MaskArgs, clear_clean_images, heatmap_to_mask, saliency_heatmap
from fnf.rewards import ColorRegion


def test_threshold_then_dilation_gives_a_square_of_side_2r_plus_1():
    heatmap = torch.zeros(1, 1, 9, 9)
    heatmap[0, 0, 4, 4] = 0.9
    heatmap[0, 0, 0, 0] = 0.4  # below the threshold
    mask = heatmap_to_mask(heatmap, MaskArgs(threshold=0.5, dilation=2))
    expected = torch.zeros(1, 1, 9, 9)
    expected[0, 0, 2:7, 2:7] = 1
    assert torch.equal(mask, expected)


def test_threshold_and_clean_score_include_their_own_value():
    """A pixel at the threshold is in the mask (threshold 1 keeps a peak-normalised map's peak, as documented);
    an image scoring exactly clean_score counts as clean."""
    heatmap = torch.tensor([[[[0.5, 0.49], [1.0, 0.0]]]])
    assert heatmap_to_mask(heatmap, MaskArgs(threshold=0.5, dilation=0)).flatten().tolist() == [1, 0, 1, 0]
    assert heatmap_to_mask(heatmap, MaskArgs(threshold=1.0, dilation=0)).flatten().tolist() == [0, 0, 1, 0]
    cleared = clear_clean_images(heatmap.expand(3, -1, -1, -1), torch.tensor([0.2, 0.3, 0.31]), clean_score=0.3)
    assert cleared.amax(dim=(1, 2, 3)).tolist() == [1.0, 0.0, 0.0]


def test_soft_mask_contains_the_hard_mask_and_fades_out():
    heatmap = torch.zeros(1, 1, 15, 15)
    heatmap[0, 0, 7, 7] = 1.0
    hard = heatmap_to_mask(heatmap, MaskArgs(dilation=1))
    soft = heatmap_to_mask(heatmap, MaskArgs(dilation=1, kind="soft", feather=1.5))
    assert torch.equal(soft[hard == 1], torch.ones(9))
    ring = soft[0, 0, 7, 9:12]  # right of the hard square
    assert 0 < ring[-1] < ring[0] < 1 and soft.max() <= 1 and soft.min() >= 0


def test_saliency_lights_up_only_where_the_score_looks():
    head = ColorRegion(color=(1.0, 0.0, 0.0), box=(0.0, 0.0, 0.5, 0.5))
    images = torch.rand(2, 3, 16, 16)
    saliency = saliency_heatmap(head, images, ["", ""], sigma=0.0)
    assert saliency.shape == (2, 1, 16, 16) and saliency.amax(dim=(1, 2, 3)).eq(1).all()
    assert saliency[:, :, 8:, :].abs().sum() == 0 and saliency[:, :, :, 8:].abs().sum() == 0
    mask = heatmap_to_mask(saliency_heatmap(head, images, ["", ""], sigma=1.0), MaskArgs(threshold=0.2, dilation=0))
    inside = mask[:, :, :8, :8].mean()
    assert inside > 0.5 and mask[:, :, 10:, 10:].sum() == 0


def test_saliency_works_inside_inference_mode():  # Lightning's validate / test run in inference mode
    head, images = ColorRegion(), torch.rand(2, 3, 16, 16)
    expected = saliency_heatmap(head, images, ["", ""], sigma=0.0)
    with torch.inference_mode():
        got = saliency_heatmap(head, images.clone(), ["", ""], sigma=0.0)
    torch.testing.assert_close(got, expected)


def test_saliency_takes_each_pixels_strongest_channel_and_its_own_sigma():
    """|d score / d image| of a score reading pixel A's red channel (weight 1) and pixel B's three channels
    (0.6 each): the max over channels puts A at the peak and B at 0.6 (a mean would make B the peak). The sigma
    the config sets (masks.saliency_sigma) reaches the map FocusNFix localises with."""
    from fnf.objective import term_heatmaps
    from fnf.module import RewardTerm
    from fnf.rewards.base import RewardHead, RewardOutput

    class TwoPixels(RewardHead):
        def forward(self, images, prompts):
            score = images[:, 0, 1, 1] + 0.6 * images[:, :, 5, 5].sum(1)
            return RewardOutput(score=score, heatmap=None)

    images = torch.rand(2, 3, 8, 8)
    saliency = saliency_heatmap(TwoPixels(), images, ["", ""], sigma=0.0)
    assert saliency[:, 0, 1, 1].tolist() == [1.0, 1.0]
    torch.testing.assert_close(saliency[:, 0, 5, 5], torch.full((2,), 0.6))
    assert saliency.sum().item() == pytest.approx(2 * 1.6)  # nothing anywhere else
    terms, heads = [RewardTerm(TwoPixels(), mask="saliency")], [TwoPixels()]
    for sigma in (0.0, 1.0):
        (heatmap,), _ = term_heatmaps(terms, heads, images, ["", ""], saliency_sigma=sigma)
        torch.testing.assert_close(heatmap, saliency_heatmap(TwoPixels(), images, ["", ""], sigma=sigma))
    assert not torch.equal(term_heatmaps(terms, heads, images, ["", ""], 1.0)[0][0], saliency)


def test_a_heads_own_threshold_cuts_its_map_and_the_others_use_the_runs(tiny_model_dir):
    """Two heads with the same map of 0.3 / 0.6 halves: the run's threshold 0.5 keeps the 0.6 half for the first,
    its own 0.25 keeps both halves for the second."""
    from test_module import _module  # the FNF step test's setup

    from fnf.module import RewardTerm
    module = _module(tiny_model_dir, lam=1.0, mask_mode="per_head", masks=MaskArgs(threshold=0.5, dilation=0),
                     rewards=[RewardTerm(ColorRegion(), name="run"), RewardTerm(ColorRegion(), threshold=0.25)])
    halves = torch.full((1, 1, 4, 4), 0.3)
    halves[..., 2:] = 0.6
    module.problem_heatmaps = lambda images, prompts: ([halves, halves], torch.zeros(1, 2))
    masks, _, _ = module._localise(torch.zeros(1, 3, 4, 4), [""])
    assert masks[0, 0].mean().item() == 0.5 and masks[0, 1].mean().item() == 1.0
    from fnf.scan_file import scan_settings  # a scan's mask areas depend on it: data.filter compares it

    heads = scan_settings(module, None)["heads"]
    assert heads["run"]["threshold"] is None and heads["ColorRegion"]["threshold"] == 0.25
    with pytest.raises(ValueError, match=r"^model.rewards\[0\].threshold must be in \(0, 1\] or null, got 1.5"):
        _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(ColorRegion(), threshold=1.5)])
    with pytest.raises(ValueError, match=r"^model.rewards\[0\].threshold cuts this head's mask, and it has none"):
        _module(tiny_model_dir, lam=1.0, rewards=[RewardTerm(ColorRegion(), mask="none", threshold=0.5),
                                                  RewardTerm(ColorRegion(), name="b")])


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=1.5), dict(dilation=-1), dict(feather=0.0),
                                 dict(saliency_sigma=-1.0)])
def test_bad_mask_args_name_the_key(bad):
    with pytest.raises(ValueError, match="^model.masks." + next(iter(bad))):
        MaskArgs(**bad)
