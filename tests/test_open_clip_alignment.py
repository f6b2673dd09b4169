"""OpenCLIPAlignment on a tiny random open_clip model built in the test (no download)."""

from __future__ import annotations


import pytest
import torch

from fnf.masks import saliency_heatmap
from fnf.metrics import CLIPScore
from fnf.rewards.open_clip_alignment import OpenCLIPAlignment


def test_score_is_scaled_cosine_and_reaches_the_pixels(tiny_clip):
    head = OpenCLIPAlignment(tiny_clip)
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to the model's 32 inside
    prompts = ["a red circle", "a blue square"]
    score = head(images, prompts).score
    expected = 100 * (head.image_features(images) * head.text_features(prompts)).sum(-1)
    torch.testing.assert_close(score, expected)
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_negative_prompts_subtract_their_mean_similarity(tiny_clip):
    plain, probed = OpenCLIPAlignment(tiny_clip), OpenCLIPAlignment(tiny_clip, negative_prompts=["nsfw", "blurry"],
                                                                    negative_weight=0.5)
    images, prompts = torch.rand(3, 3, 32, 32), ["a", "b", "c"]
    negatives = (plain.image_features(images) @ plain.text_features(["nsfw", "blurry"]).T).mean(-1)
    torch.testing.assert_close(probed(images, prompts).score, plain(images, prompts).score - 100 * 0.5 * negatives)


def test_saliency_mask_and_clip_score_use_it(tiny_clip):
    head = OpenCLIPAlignment(tiny_clip)
    images = torch.rand(2, 3, 32, 32)
    saliency = saliency_heatmap(head, images, ["a", "b"], sigma=1.0)
    assert saliency.shape == (2, 1, 32, 32) and saliency.amax() == 1
    metric = CLIPScore(head)
    metric.update(images, ["a", "b"])
    assert 0 <= metric.compute() <= 100


@pytest.mark.parametrize("model, pretrained, match", [
    ("no-such-model", "tag", "cannot load open_clip model 'no-such-model'"),
    ("ViT-B-32", None, "needs pretrained="),
    ("ViT-B-32", "weights.bin", "is a pickle file"),
])
def test_bad_model_is_one_clear_error(model, pretrained, match):
    with pytest.raises(ValueError, match=match):
        OpenCLIPAlignment(model, pretrained=pretrained)
