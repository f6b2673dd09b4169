"""Saliency: a scalar reward head becomes a heatmap head (gradient saliency or Grad-CAM) of what lowers its score."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fnf.masks import MaskArgs
from fnf.module import FocusNFix, RewardTerm
from fnf.rewards import ColorRegion, RewardHead, RewardOutput, ShapesSafety
from fnf.rewards.base import check_reward_output
from fnf.rewards.saliency import Saliency
from fnf.sampling import SamplerArgs
from fnf.worlds.shapes.generator import make_batch

SAFETY_LAYER = "net.body.6"  # ShapesSafety's last 3x3 conv: its last spatial feature map before the 1x1 logit conv
SAFE_ENOUGH = -math.log(2)  # ShapesSafety: top-k pixels' mean softplus(logit) below log 2, i.e. below even odds


class RednessInBoxPenalty(RewardHead):
    """Higher is better, and redness (a 1×1 conv feature) in the top-left quarter *lowers* the score."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))

    def forward(self, images, prompts):
        side = images.shape[-1] // 2
        return RewardOutput(score=-self.features(images)[..., :side, :side].mean(dim=(1, 2, 3)))


@pytest.fixture(scope="module")
def scenes() -> dict:
    """8 unsafe and 8 clean shapes-world scenes with their ground-truth mark masks."""
    data = make_batch(64, seed=0, unsafe_rate=1.0)
    unsafe, clean = data["unsafe"].nonzero()[:8, 0], (~data["unsafe"]).nonzero()[:8, 0]
    assert len(unsafe) == len(clean) == 8
    return {name: (data["images"][rows], data["unsafe_masks"][rows], [data["prompts"][i] for i in rows])
            for name, rows in (("unsafe", unsafe), ("clean", clean))}


@pytest.mark.parametrize("method, layer", [("gradient", None), ("gradcam", "features")])
def test_heatmap_marks_what_lowers_the_score(method, layer):
    images = torch.zeros(2, 3, 16, 16)
    images[:, 0, :8, :8] = 1.0  # red in the scored box: the problem
    images[:, 2, 8:, 8:] = 1.0  # blue elsewhere: the score never looks there (its redness feature is negative)
    head = Saliency(RednessInBoxPenalty(), method=method, layer=layer, sigma=0.0)
    with torch.inference_mode():  # as in Lightning's validate / test
        out = check_reward_output(head, head(images, ["", ""]), images)
    torch.testing.assert_close(out.score, RednessInBoxPenalty()(images, ["", ""]).score)
    assert out.heatmap[..., :8, :8].mean() > 0.5 and out.heatmap[..., 8:, 8:].max() == 0
    assert head.name == f"RednessInBoxPenalty+{method}"


def test_gradcam_is_selvaraju_s_on_the_negated_score(scenes):
    """Grad-CAM computed here step by step (Selvaraju et al. 2017, of −score): channel weights = the spatial mean of
    −score's gradient, ReLU of the weighted activations, upsampled, smoothed by ``sigma``, peak-normalised."""
    from fnf.masks import blur

    images, _, prompts = scenes["unsafe"]
    safety = ShapesSafety(heatmap="none").requires_grad_(False)
    captured = []
    hook = dict(safety.named_modules())[SAFETY_LAYER].register_forward_hook(lambda m, i, out: captured.append(out))
    (gradient,) = torch.autograd.grad(-safety(images.clone().requires_grad_(True), prompts).score.sum(), captured[0])
    hook.remove()
    cam = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured[0]).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    maps = []
    for sigma in (0.0, 2.0):
        expected = blur(cam, sigma) if sigma else cam
        expected = expected / expected.amax(dim=(1, 2, 3), keepdim=True)
        got = Saliency(safety, method="gradcam", layer=SAFETY_LAYER, sigma=sigma)(images, prompts).heatmap
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        maps.append(got)
    assert not torch.allclose(*maps, atol=1e-2)  # sigma smooths


@pytest.mark.parametrize("method, layer", [("gradient", None), ("gradcam", SAFETY_LAYER)])
def test_shapes_safety_heatmap_peaks_on_the_mark(scenes, method, layer):
    """The pointing game of REWARDS_CARD.md: the heatmap's peak within 1 px of the forbidden mark."""
    images, marks, prompts = scenes["unsafe"]
    heatmap = Saliency(ShapesSafety(heatmap="none"), method=method, layer=layer)(images, prompts).heatmap
    near_mark = F.max_pool2d(marks, 3, stride=1, padding=1).flatten(1)  # (8, H*W), the mark grown by 1 px
    hits = near_mark.gather(1, heatmap.flatten(1).argmax(dim=1, keepdim=True))
    assert hits.sum() >= 7, f"{method}: peak on the mark in {int(hits.sum())} of 8 unsafe scenes"


@pytest.mark.parametrize("method, layer", [("gradient", None), ("gradcam", SAFETY_LAYER)])
def test_clean_images_get_an_all_zero_heatmap(scenes, method, layer):
    head = ShapesSafety(heatmap="none")
    images, _, prompts = scenes["clean"]
    if method == "gradient":  # peak-normalised: without the criterion every clean image has a region to change
        assert Saliency(head, method, layer)(images, prompts).heatmap.flatten(1).amax(1).eq(1).all()
    out = Saliency(head, method, layer, clean_score=SAFE_ENOUGH)(images, prompts)
    assert (out.score >= SAFE_ENOUGH).all() and out.heatmap.max() == 0
    images, _, prompts = scenes["unsafe"]
    out = Saliency(head, method, layer, clean_score=SAFE_ENOUGH)(images, prompts)
    assert (out.score < SAFE_ENOUGH).all() and out.heatmap.flatten(1).amax(1).eq(1).all()


@pytest.mark.parametrize("policy", ["keep", "skip", "global"])
@pytest.mark.parametrize("via", ["Saliency head", "mask: saliency"])
def test_the_empty_mask_policy_applies_to_clean_images(tiny_model_dir, scenes, policy, via):
    """Through FocusNFix's mask building: clean rows get an empty mask, then model.masks.empty decides."""
    if via == "Saliency head":
        term = RewardTerm(Saliency(ShapesSafety(heatmap="none"), clean_score=SAFE_ENOUGH), mask="heatmap")
    else:
        term = RewardTerm(ShapesSafety(heatmap="none"), mask="saliency", clean_score=SAFE_ENOUGH)
    module = FocusNFix(rewards=[term], pretrained=tiny_model_dir,
                       sampler=SamplerArgs(num_steps=2), masks=MaskArgs(empty=policy))
    (clean, _, clean_prompts), (unsafe, marks, unsafe_prompts) = scenes["clean"][:4], scenes["unsafe"]
    masks, active, _ = module._localise(torch.cat([clean[:4], unsafe]), clean_prompts[:4] + unsafe_prompts)
    clean_masks, unsafe_masks = masks[:4], masks[4:]
    assert torch.equal(active[:4, 0], torch.full((4,), 0.0 if policy == "skip" else 1.0))
    assert clean_masks.min() == clean_masks.max() == (1.0 if policy == "global" else 0.0)
    assert active[4:].eq(1).all() and unsafe_masks.mean() < 0.25  # unsafe rows: a local mask ...
    assert (unsafe_masks * marks).sum() / marks.sum() > 0.5  # ... over most of the mark


def test_the_wrapper_costs_no_more_head_calls_per_step_than_mask_saliency(tiny_model_dir):
    """The tuned pass reads scores only (``scores_only``): a Saliency head skips its heatmap's gradient pass there,
    so wrapping a scalar head costs what ``mask: saliency`` on it costs: one scoring call of I, two of I0."""
    from fnf.data import collate

    calls = {}
    for via in ("Saliency head", "mask: saliency"):
        inner = RednessInBoxPenalty()
        inner.register_forward_hook(lambda *args, via=via: calls.__setitem__(via, calls.get(via, 0) + 1))
        term = (RewardTerm(Saliency(inner), mask="heatmap") if via == "Saliency head"
                else RewardTerm(inner, mask="saliency"))
        module = FocusNFix(rewards=[term], pretrained=tiny_model_dir, lam=1.0, sampler=SamplerArgs(num_steps=2))
        module._common_step(collate([{"prompt": "a red circle", "seed": 0}]), "train")
    assert calls == {"Saliency head": 3, "mask: saliency": 3}


def test_wrapping_a_heatmap_head_replaces_its_heatmap():
    images = torch.rand(1, 3, 16, 16)
    out = Saliency(ColorRegion(box=(0.0, 0.0, 0.5, 0.5)), sigma=0.0)(images, [""])
    assert out.heatmap[..., 8:, :].max() == 0 and out.heatmap.max() == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="gradcam", layer="nope"), "Saliency.layer: 'nope' is not a module of RednessInBoxPenalty"),
    (dict(method="gradient", layer="features"), "Saliency.layer is for method gradcam only"),
    (dict(method="cam"), "Saliency.method must be 'gradient' or 'gradcam', got 'cam'"),
    (dict(sigma=-1.0), "Saliency.sigma must be >= 0, got -1.0"),
    (dict(clean_score=float("nan")), "Saliency.clean_score must be a finite score or null, got nan"),
])
def test_bad_arguments_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Saliency(RednessInBoxPenalty(), **kwargs)
