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


def _uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1], multiples of 1/255: exact through a PIL round trip."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)) / 255


def test_clip_score_is_the_reference_formula_on_open_clips_own_pipeline(tiny_clip):
    """CLIPScore (Hessel et al. 2021; torchmetrics' definition) = mean over pairs of 100 · max(cos(E_I, E_C), 0),
    computed here by hand on open_clip's own path: its PIL preprocessing transform, its tokenizer, raw
    embeddings, cos = a·b / (‖a‖‖b‖). Images at the model's 32 px, so no resize method is involved."""
    import open_clip
    from PIL import Image

    images = _uint8_images(4, 32, seed=0)
    prompts = ["a red circle", "a blue square", "a green triangle", "two yellow diamonds"]
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip)
    pixels = torch.stack([preprocess(Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()))
                          for image in images])
    with torch.no_grad():
        a, b = model.encode_image(pixels), model.encode_text(open_clip.get_tokenizer(tiny_clip)(prompts))
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    head = OpenCLIPAlignment(tiny_clip)
    torch.testing.assert_close(head(images, prompts).score, 100 * cosine, rtol=1e-5, atol=1e-4)
    metric = CLIPScore(head)
    metric.update(images[:2], prompts[:2])  # states accumulate over updates
    metric.update(images[2:], prompts[2:])
    torch.testing.assert_close(metric.compute(), (100 * cosine.clamp_min(0)).mean(), rtol=1e-5, atol=1e-4)


class _EverySecondPromptReversed(torch.nn.Module):
    """The tiny model with the 2nd, 4th, ... prompt's text embedding negated (cos -> −cos), so a batch holds
    pairs on both sides of CLIPScore's max(·, 0)."""

    def __init__(self, head: OpenCLIPAlignment) -> None:
        super().__init__()
        self.head = head

    def image_features(self, images):
        return self.head.image_features(images)

    def text_features(self, prompts):
        signs = torch.tensor([1.0, -1.0]).repeat(len(prompts))[: len(prompts), None]  # (B, 1)
        return signs * self.head.text_features(prompts)


def test_clip_score_counts_negative_cosines_as_zero(tiny_clip):
    head = OpenCLIPAlignment(tiny_clip)
    images, prompts = _uint8_images(4, 32, seed=1), ["a red circle", "a blue square", "a green circle", "a square"]
    cosine = head(images, prompts).score / 100
    assert (cosine > 0).all()  # the random tiny model's: reversed, every second pair is negative
    metric = CLIPScore(_EverySecondPromptReversed(head))
    metric.update(images, prompts)
    torch.testing.assert_close(metric.compute(), 100 * cosine[::2].sum() / 4, rtol=1e-5, atol=1e-4)


def test_saliency_marks_the_pixels_whose_change_moves_the_score(tiny_clip):
    """The saliency mask (σ = 0) against central differences of the head itself, pixel by pixel and channel by
    channel: max over channels of |Δscore / Δpixel|, peak-normalised per image. 16 px images (upsampled to 32
    inside the head), two images so that one image's map cannot come from the other's gradient."""
    head = OpenCLIPAlignment(tiny_clip)
    images, prompts = _uint8_images(2, 16, seed=2), ["a red circle", "a blue square"]
    saliency = saliency_heatmap(head, images, prompts, sigma=0.0)
    step = 1e-2  # error O(step²) + float32 rounding of ~50-point scores / step: ~2e-3 on the map, tolerance 1e-2
    nudges = torch.eye(3 * 16 * 16).reshape(-1, 3, 16, 16) * step  # one pixel-channel per row
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            many = [prompt] * len(nudges)
            slope = (head(image + nudges, many).score - head(image - nudges, many).score) / (2 * step)
            sensitivity = slope.reshape(3, 16, 16).abs().amax(0)  # (3, 16, 16) -> (16, 16)
            expected.append(sensitivity / sensitivity.max())
    torch.testing.assert_close(saliency[:, 0], torch.stack(expected), rtol=0, atol=1e-2)
    assert not torch.allclose(saliency[0], saliency[1], atol=0.1)  # two different maps


@pytest.mark.parametrize("model, pretrained, match", [
    ("no-such-model", "tag", "cannot load open_clip model 'no-such-model'"),
    ("ViT-B-32", None, "needs pretrained="),
    ("ViT-B-32", "weights.bin", "is a pickle file"),
    ("hf-hub:fnf-test/no-such-clip", None, "cannot load open_clip model 'hf-hub:fnf-test/no-such-clip'"),  # its own
])
def test_bad_model_is_one_clear_error(model, pretrained, match, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no minute of retries for hf-hub:
    with pytest.raises(ValueError, match=match):
        OpenCLIPAlignment(model, pretrained=pretrained)


def test_a_tag_that_cannot_be_downloaded_says_how_to_pass_the_weights_as_a_file(monkeypatch):
    """Offline (or the hub unreachable): the hub's long message is cut at a word, and the line says what to do."""
    import huggingface_hub.constants

    from fnf.rewards.base import WEIGHTS_HOWTO

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as error:
        OpenCLIPAlignment("ViT-B-32", pretrained="laion2b_s34b_b79k")
    reason, _, action = str(error.value).partition(" ...; ")
    assert reason.startswith("OpenCLIPAlignment: cannot load open_clip model 'ViT-B-32' (pretrained='laion2b_s34b_b79k'"
                             "): Failed to download") and len(reason) < 400, reason
    assert action == (f"without the hub, pass the weights as a file, pretrained: <file>.safetensors with tag: "
                      f"laion2b_s34b_b79k; {WEIGHTS_HOWTO}")


def test_a_weights_path_that_is_not_a_file_is_named_before_open_clip_logs(tmp_path, caplog):
    """open_clip would log its list of tags as an error, then fail with 'not a known tag or valid file path'."""
    for path, what in ((tmp_path / "missing.safetensors", "no such file"), (tmp_path, "a folder")):
        with pytest.raises(FileNotFoundError, match=f"OpenCLIPAlignment.pretrained: {path}: {what}; expected a "
                                                    ".safetensors file or an open_clip tag"):
            OpenCLIPAlignment("ViT-B-32", pretrained=str(path))
    assert not caplog.records


def test_loading_leaves_logging_as_it_was(tiny_clip, caplog):
    """open_clip's own error logs are silenced while it loads, and only then: the run's INFO lines still show."""
    import logging

    before = logging.root.manager.disable
    try:
        OpenCLIPAlignment(tiny_clip)
        assert logging.root.manager.disable == before
        with caplog.at_level(logging.INFO):
            logging.getLogger("fnf.test").info("still heard")
        assert "still heard" in caplog.messages
    finally:
        logging.disable(before)  # under a regression, not for the rest of the session


def test_an_unknown_pretrained_tag_is_one_line_without_open_clips_error_log(caplog):
    """open_clip logs its list of tags as an ERROR, then raises; the user gets one line and no log dump."""
    import logging

    caplog.set_level(logging.INFO)  # (caplog.at_level would restore logging.disable itself on leaving)
    before = logging.root.manager.disable
    with pytest.raises(ValueError) as error:
        OpenCLIPAlignment("ViT-B-32", pretrained="no_such_tag")
    assert str(error.value) == ("OpenCLIPAlignment: cannot load open_clip model 'ViT-B-32' (pretrained='no_such_tag'): "
                                "Pretrained value 'no_such_tag' is not a known tag or valid file path")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert logging.root.manager.disable == before


@pytest.mark.parametrize("side", [(48, 48), (40, 64), (64, 40)])
def test_images_are_resized_and_cropped_as_open_clips_eval_transform(tiny_clip, side):
    """open_clip's transform (shortest side to 32 with its interpolation, centre crop, normalise) applied to the
    tensors themselves gives the head's features: non-square images are cropped, not squashed."""
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(tiny_clip)
    head = OpenCLIPAlignment(tiny_clip)
    images = torch.rand(2, 3, *side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = head.model.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
        torch.testing.assert_close(head.image_features(images), expected, rtol=0, atol=1e-5)


def test_a_local_weights_file_takes_its_published_tags_preprocessing_and_activation(tmp_path, monkeypatch):
    """open_clip gives weights from a file its defaults (OpenAI's mean / std, GELU): right for some tags only. A
    model whose tags differ needs ``tag``; the file then gets that tag's mean, std, resize and QuickGELU."""
    import json

    import open_clip
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                              "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fnf-tiny-tagged.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fnf-tiny-tagged.json")
    weights = tmp_path / "weights.safetensors"
    save_file(open_clip.create_model("fnf-tiny-tagged").state_dict(), str(weights))
    published = {"plain": {}, "quick": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "quick_gelu": True,
                                        "interpolation": "bilinear", "resize_mode": "squash"}}
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda model: list(published))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda model, tag: published[tag])
    with pytest.raises(ValueError, match=r"^OpenCLIPAlignment.tag: a local file for fnf-tiny-tagged needs the tag "
                                         r"its weights were published as .*\['plain', 'quick'\]\); set tag"):
        OpenCLIPAlignment("fnf-tiny-tagged", pretrained=str(weights))
    with pytest.raises(ValueError, match=r"^OpenCLIPAlignment.tag: fnf-tiny-tagged has no pretrained tag 'openai'"):
        OpenCLIPAlignment("fnf-tiny-tagged", pretrained=str(weights), tag="openai")
    with pytest.raises(ValueError, match=r"^OpenCLIPAlignment.tag is read only with a local .safetensors file"):
        OpenCLIPAlignment("fnf-tiny-tagged", pretrained="quick", tag="quick")
    quick = OpenCLIPAlignment("fnf-tiny-tagged", pretrained=str(weights), tag="quick")
    assert quick.mean.flatten().tolist() == [0.0] * 3 and quick.std.flatten().tolist() == [1.0] * 3
    assert (quick.interpolation, quick.resize_mode) == ("bilinear", "squash")
    assert any(isinstance(m, QuickGELU) for m in quick.model.modules())
    plain = OpenCLIPAlignment("fnf-tiny-tagged", pretrained=str(weights), tag="plain")
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules()) and plain.mean.flatten()[0] > 0.4
