from pathlib import Path

import pytest
import torch

from fnf.rewards import (ColorRegion, NudeNetSafety, OpenCLIPAlignment, RAHFHeatmap, RAHFReproductionHeatmap, RewardHead,
                         RewardOutput, Saliency, ShapesAlignment, ShapesArtifact, ShapesSafety, check_head)
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


@pytest.mark.parametrize("shape", [(2, 1, 4, 4), (2, 3, 8, 8), (1, 1, 8, 8), (2, 8, 8)])
def test_heatmap_shape_is_checked_even_without_values(shape):
    """One single-channel map per image at the image's size: no channels, batch or size broadcast silently."""
    output = RewardOutput(score=torch.zeros(2), heatmap=torch.rand(shape))
    with pytest.raises(ValueError, match=r"heatmap must have shape \(2, 1, 8, 8\)"):
        check_reward_output(ColorRegion(), output, IMAGES, values=False)


@pytest.mark.parametrize("score, got", [([0.0, 0.0], "list"), (torch.zeros(2, dtype=torch.long), "torch.int64 on cpu"),
                                        (torch.zeros(2, device="meta"), "torch.float32 on meta")])
def test_score_is_a_floating_point_tensor_on_the_images_device(score, got):
    output = RewardOutput(score=score, heatmap=None)
    with pytest.raises(ValueError, match=rf"ColorRegion: score must be a floating-point tensor on the images' device "
                                         rf"\(cpu\), got {got}"):
        check_reward_output(ColorRegion(), output, IMAGES)


def test_a_heatmap_out_of_range_shows_the_range_it_has():
    output = RewardOutput(score=torch.zeros(2), heatmap=torch.full((2, 1, 8, 8), 255.0))
    with pytest.raises(ValueError, match=r"heatmap values must be finite and in \[0, 1\], got \[255, 255\]"):
        check_reward_output(ColorRegion(), output, IMAGES)


@pytest.mark.parametrize("shape", [(2, 1), (1,), (), (4,)])
def test_score_shape_is_one_number_per_image(shape):
    output = RewardOutput(score=torch.zeros(shape), heatmap=None)
    with pytest.raises(ValueError, match=r"ColorRegion: score must have shape \(2,\), got"):
        check_reward_output(ColorRegion(), output, IMAGES)


def test_color_region_scores_and_marks_exactly_its_box():
    """box (0, 0, 0.5, 0.5) of an 8 px image is rows and columns 0-3: the heatmap is the colour distance there
    and zero elsewhere; the score is minus the mean distance over the box."""
    images = torch.rand(2, 3, 8, 8)
    output = ColorRegion(color=(1.0, 0.0, 0.0), box=(0.0, 0.0, 0.5, 0.5))(images, ["", ""])
    distance = ((images - torch.tensor([1.0, 0.0, 0.0])[:, None, None]) ** 2).mean(dim=1, keepdim=True)
    expected = torch.zeros_like(distance)
    expected[..., :4, :4] = distance[..., :4, :4]
    torch.testing.assert_close(output.heatmap, expected)
    torch.testing.assert_close(output.score, -distance[..., :4, :4].mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"^ColorRegion.box \(0.0, 0.0, 0.02, 0.02\) covers no pixel of a 32x32 image"):
        ColorRegion(box=(0.0, 0.0, 0.02, 0.02))(torch.rand(1, 3, 32, 32), [""])  # was a NaN score


def test_a_valid_output_passes():
    head = ColorRegion()
    assert check_reward_output(head, head(IMAGES, ["a", "b"]), IMAGES).score.shape == (2,)


# ---- every built-in head (and the plugin-guide example) keeps the contract ------------------------------------
REPO = Path(__file__).parents[1]


def _heads(request) -> dict:
    """name -> a zero-argument factory; heads with real weights use them, hub-only ones a tiny random model."""
    from examples.custom_reward import BlueSky

    def nudenet_head():
        pytest.importorskip("onnx2torch", reason="optional extra: pip install fnf[nudenet]")
        return NudeNetSafety()

    def open_clip_head():
        return OpenCLIPAlignment(model=request.getfixturevalue("tiny_clip"), negative_prompts=["blurry"])

    return {
        "ColorRegion": ColorRegion,
        "ShapesArtifact": ShapesArtifact,
        "ShapesSafety": ShapesSafety,
        "ShapesAlignment": ShapesAlignment,
        "OpenCLIPAlignment": open_clip_head,
        "NudeNetSafety": nudenet_head,
        "RAHFHeatmap": lambda: RAHFHeatmap(request.getfixturevalue("tiny_rahf")),
        "RAHFReproductionHeatmap": lambda: RAHFReproductionHeatmap(*request.getfixturevalue("tiny_rahf_reproduction")),
        "Saliency(gradient)": lambda: Saliency(ShapesAlignment()),
        "Saliency(gradcam)": lambda: Saliency(ShapesSafety(), method="gradcam", layer="net.body.7"),
        "BlueSky (examples/custom_reward.py)": BlueSky,
    }


HEAD_NAMES = ["ColorRegion", "ShapesArtifact", "ShapesSafety", "ShapesAlignment", "OpenCLIPAlignment", "NudeNetSafety",
              "RAHFHeatmap", "RAHFReproductionHeatmap", "Saliency(gradient)", "Saliency(gradcam)",
              "BlueSky (examples/custom_reward.py)"]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_every_head_keeps_the_contract(name, request, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # examples/ imports from the repository root, like a user's package
    head = _heads(request)[name]()
    output = check_head(head)  # what a head author runs in their own tests
    assert output.score.dtype == torch.float32 and head.gives_heatmap != "undeclared"


class _Mean(RewardHead):
    """A valid head to break one rule at a time: the mean of the image."""

    gives_heatmap = "no"

    def forward(self, images, prompts):
        return RewardOutput(score=images.mean(dim=(1, 2, 3)))


class _NoGradient(_Mean):
    def forward(self, images, prompts):
        return RewardOutput(score=super().forward(images, prompts).score * 0)


class _Random(_Mean):
    def forward(self, images, prompts):
        return RewardOutput(score=super().forward(images, prompts).score + torch.rand(len(images)))


class _BatchNormalised(_Mean):
    def forward(self, images, prompts):
        score = super().forward(images, prompts).score
        return RewardOutput(score=score - score.mean())


class _Infinite(_Mean):
    def forward(self, images, prompts):
        return RewardOutput(score=super().forward(images, prompts).score / 0)


class _SaysHeatmap(_Mean):
    gives_heatmap = "yes"


@pytest.mark.parametrize("head, rule", [
    (_NoGradient(), "reward head _NoGradient: the score's gradient with respect to the pixels is zero"),
    (_Random(), "reward head _Random: two calls on the same images differ"),
    (_BatchNormalised(), "reward head _BatchNormalised: image 0 scores 0 alone but"),
    (_Infinite(), "reward head _Infinite: scores must be finite"),
    (_SaysHeatmap(), "reward head _SaysHeatmap: gives_heatmap = 'yes', but forward returned no heatmap"),
])
def test_check_head_names_the_rule_a_head_breaks(head, rule):
    check_head(_Mean())
    with pytest.raises(ValueError) as error:
        check_head(head)
    assert str(error.value).startswith(rule), error.value


def test_the_example_head_is_selected_from_yaml_by_class_path(config, monkeypatch, tmp_path):
    import yaml

    from fnf.cli import main

    monkeypatch.syspath_prepend(str(REPO))
    data = yaml.safe_load(config.read_text())
    data["model"]["rewards"] = [{"head": {"class_path": "examples.custom_reward.BlueSky",
                                          "init_args": {"fraction": 0.5}}, "mask": "heatmap"}]
    path = tmp_path / "blue_sky.yaml"
    path.write_text(yaml.safe_dump(data))
    main(["fit", "--config", str(path), "--trainer.fast_dev_run=true", "--trainer.default_root_dir", str(tmp_path)])


def test_the_example_heads_heatmap_reaches_1_so_the_default_threshold_masks_a_wrong_sky(monkeypatch):
    """The guide's head as written must give masks at the usual thresholds (its heatmap topped out at 0.5 once:
    every mask empty at the default 0.5 and the configs' 0.7, so training preserved the whole image)."""
    from fnf.masks import MaskArgs, heatmap_to_mask

    monkeypatch.syspath_prepend(str(REPO))
    from examples.custom_reward import BlueSky

    yellow, blue = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    images = torch.stack([yellow, blue])[:, :, None, None].expand(2, 3, 12, 12)
    heatmap = BlueSky().eval()(images, ["a", "b"]).heatmap
    mask = heatmap_to_mask(heatmap, MaskArgs(threshold=0.7, dilation=0)).bool()
    assert heatmap[0].max() == 1 and mask[0, :, :4].all() and not mask[0, :, 4:].any() and not mask[1].any()


class _Dropout(_Mean):
    """A valid head with a Dropout layer, handed over in train mode (as a freshly built nn.Module is)."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, images, prompts):
        return RewardOutput(score=self.drop(images).mean(dim=(1, 2, 3)))


def test_check_head_puts_the_head_in_eval_mode_as_the_trainer_does():
    """Dropout is random only in train mode: a head author's test must not fail a head the trainer would run fine."""
    head = _Dropout().train()
    assert check_head(head).score.shape == (4,) and not head.training


class _DetachedScore(_Mean):
    def forward(self, images, prompts):
        return RewardOutput(score=super().forward(images, prompts).score.detach())


class _NaNGradient(_Mean):
    def forward(self, images, prompts):
        return RewardOutput(score=images.sqrt().mean(dim=(1, 2, 3)))  # d sqrt(x) / dx at 0: inf


class _RandomHeatmap(_Mean):
    gives_heatmap = "yes"

    def forward(self, images, prompts):
        return RewardOutput(score=super().forward(images, prompts).score, heatmap=torch.rand_like(images[:, :1]))


@pytest.mark.parametrize("head, images, rule", [
    (_DetachedScore(), None, "reward head _DetachedScore: score has no gradient with respect to the images"),
    (_NaNGradient(), torch.zeros(2, 3, 8, 8), "reward head _NaNGradient: the score's gradient with respect to the "
                                              "pixels is zero or not finite"),
    (_RandomHeatmap(), None, "reward head _RandomHeatmap: two calls on the same images differ"),
], ids=["detached", "infinite-gradient", "random-heatmap"])
def test_check_head_names_the_rule_not_a_raw_error(head, images, rule):
    """A detached score is the trainer's rule line (not autograd's 'does not require grad'); a gradient that is
    not finite and a heatmap that changes between calls (with a fixed score) are each refused on their own."""
    with pytest.raises(ValueError) as error:
        check_head(head, images)
    assert str(error.value).startswith(rule), error.value
