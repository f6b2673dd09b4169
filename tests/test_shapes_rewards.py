"""The shipped shapes-world reward heads: contract, localisation, separation and alignment quality.

Loads the committed weights (no retraining); the generator images use seeds that training never used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fnf.masks import saliency_heatmap
from fnf.rewards import ShapesAlignment, ShapesArtifact, ShapesSafety
from fnf.rewards.base import check_reward_output
from fnf.rewards.shapes import WEIGHTS_DIR
from fnf.worlds.shapes.generator import (
    COLOUR_NAMES, POSITIONS, SHAPES, ObjectSpec, Scene, make_batch, parse_prompt, prompt_of, render,
)


@pytest.fixture(scope="module")
def heads() -> dict[str, torch.nn.Module]:
    return {h.name: h.requires_grad_(False) for h in (ShapesArtifact(), ShapesSafety(), ShapesAlignment())}


@pytest.fixture(scope="module")
def scenes() -> dict:
    """300 scenes of both splits, half with a defect, every tempting one with the mark."""
    return make_batch(300, seed=987_654, defect_rate=0.5, unsafe_rate=1.0, split=None)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(random positive > random negative), ties count half."""
    diff = positive[:, None] - negative[None, :]
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


def iou(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (prediction * target).sum(dim=(1, 2, 3))
    return inter / ((prediction + target) > 0).float().sum(dim=(1, 2, 3)).clamp_min(1)


@pytest.mark.parametrize("name", ["ShapesArtifact", "ShapesSafety", "ShapesAlignment"])
@pytest.mark.parametrize("batch", [1, 4])
def test_contract(heads, scenes, name, batch):
    head = heads[name]
    images = scenes["images"][:batch].clone().requires_grad_(True)
    prompts = scenes["prompts"][:batch]
    output = check_reward_output(head, head(images, prompts), images)
    assert torch.isfinite(output.score).all()
    assert (output.heatmap is None) == (name == "ShapesAlignment")
    again = head(images, prompts)
    assert torch.equal(again.score, output.score)  # deterministic
    if output.heatmap is not None:
        assert torch.equal(again.heatmap, output.heatmap)
    output.score.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():  # inference may take other (fused attention) kernels: equal up to rounding
        assert torch.allclose(head(images, prompts).score, output.score, atol=1e-3)


def test_other_resolution(heads, scenes):
    """Heads resize internally; heatmaps come back at the input resolution."""
    images = torch.nn.functional.interpolate(scenes["images"][:2], size=(64, 64), mode="nearest")
    for head in heads.values():
        check_reward_output(head, head(images, scenes["prompts"][:2]), images)


def test_safety_heatmap_none_and_alignment_features(heads, scenes):
    output = ShapesSafety(heatmap="none")(scenes["images"][:3], scenes["prompts"][:3])
    assert output.heatmap is None and output.score.shape == (3,)
    features = heads["ShapesAlignment"].image_features(scenes["images"][:3])
    assert features.shape[0] == 3 and torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="heatmap"):
        ShapesSafety(heatmap="saliency")


def test_alignment_score_is_scale_times_the_cosine_of_open_clip_embeddings(scenes):
    """score = scale · cos(image, prompt), computed here from open_clip's own encoders; the prompt count must
    match the images; words outside the world's vocabulary are UNK (1), not padding (0)."""
    images, prompts = scenes["images"][:3], scenes["prompts"][:3]
    for scale in (100.0, 2.5):
        head = ShapesAlignment(scale=scale).requires_grad_(False)
        with torch.no_grad():
            pixels = (images - head.mean) / head.std  # the generator's images are at the heads' 32 px already
            image = head.model.encode_image(pixels)
            text = head.model.encode_text(head.tokens(prompts))
            cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
            torch.testing.assert_close(head(images, prompts).score, scale * cosine, rtol=1e-5, atol=1e-4)
            raw = head.image_features(images, normalize=False)
            torch.testing.assert_close(raw, image)
            assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-2)  # FID statistics see raw features
    with pytest.raises(ValueError, match="got 2 images but 1 prompts"):
        head(images[:2], prompts[:1])
    assert 1 in head.tokens(["a zebra"])[0].tolist()


def test_heads_see_an_antialiased_image_at_their_resolution():
    """1-px lines every 4 px at 128 px become a uniform 0.25 grey at the heads' 32 px: each output pixel averages
    its neighbourhood (sampling between the lines, as plain bilinear does, would lose them)."""
    from fnf.rewards.shapes import IMAGE_SIZE, to_native

    lines = (torch.arange(128) % 4 == 0).float().expand(1, 3, 128, 128)
    native = to_native(lines)
    assert native.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    inside = native[..., 1:-1]  # the edge columns average fewer pixels
    torch.testing.assert_close(inside, torch.full_like(inside, 0.25), atol=0.01, rtol=0)


@pytest.mark.parametrize(("name", "key"), [("ShapesArtifact", "defect"), ("ShapesSafety", "unsafe")])
def test_heatmap_localises_and_score_separates(heads, scenes, name, key):
    with torch.no_grad():
        output = heads[name](scenes["images"], scenes["prompts"])
    positive, masks = scenes[key], scenes[f"{key}_masks"]
    assert positive.sum() > 30 and (~positive).sum() > 30
    assert iou((output.heatmap >= 0.5).float()[positive], masks[positive]).mean() >= 0.5
    assert (output.heatmap[~positive] >= 0.5).flatten(1).any(1).float().mean() <= 0.05  # few false alarms
    assert auc(output.score[~positive], output.score[positive]) >= 0.95  # clean scores higher


@pytest.mark.parametrize(("name", "key"), [("ShapesArtifact", "defect"), ("ShapesSafety", "unsafe")])
def test_score_rises_along_the_removal_path(heads, scenes, name, key):
    """Well shaped for gradient ascent: fading the element into the clean render raises the score
    step by step (not only at the very end), from clearly negative to ~0."""
    keep = scenes[key].nonzero().flatten()[:40].tolist()
    clean = torch.stack([render(Scene(tuple(parse_prompt(scenes["prompts"][i]))), scenes["seeds"][i]).image
                         for i in keep])
    element = clean + scenes[f"{key}_masks"][keep] * (scenes["images"][keep] - clean)  # only this element
    with torch.no_grad():
        score = torch.stack([heads[name](clean + t * (element - clean), [""] * len(keep)).score
                             for t in torch.linspace(1, 0, 6)], dim=1)  # (N, 6), element fading out
    assert (score[:, 1:] >= score[:, :-1] - 1e-3).all(dim=1).float().mean() >= 0.9
    assert (score[:, 0] < -1).all() and (score[:, -1] > -0.1).all()
    assert (score[:, 3] - score[:, 0]).mean() > 0.5  # 60% removed already pays off


def test_safety_saliency_points_at_the_mark(scenes):
    """The heatmap="none" path: the trainer's saliency of the score should peak on the mark."""
    head = ShapesSafety(heatmap="none").requires_grad_(False)
    positive = scenes["unsafe"]
    prompts = [p for p, u in zip(scenes["prompts"], positive.tolist()) if u]
    saliency = saliency_heatmap(head, scenes["images"][positive], prompts, sigma=1.0)
    near = torch.nn.functional.max_pool2d(scenes["unsafe_masks"][positive], 3, stride=1, padding=1)
    peak = saliency.flatten(1).argmax(1)
    assert near.flatten(1).gather(1, peak[:, None]).float().mean() >= 0.9


def one_change(prompt: str, kind: str, rng: np.random.Generator) -> str:
    """The prompt with one object's colour, shape or position (to an empty cell) changed."""
    objects = parse_prompt(prompt)
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    if kind == "colour":
        obj = ObjectSpec(obj.shape, str(rng.choice([c for c in COLOUR_NAMES if c != obj.colour])), obj.position)
    elif kind == "shape":
        obj = ObjectSpec(str(rng.choice([s for s in SHAPES if s != obj.shape])), obj.colour, obj.position)
    else:
        free = [p for p in POSITIONS if p not in {o.position for o in objects}]
        obj = ObjectSpec(obj.shape, obj.colour, str(rng.choice(free)))
    objects[i] = obj
    return prompt_of(Scene(tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))))


@pytest.mark.parametrize("kind", ["colour", "shape", "position"])
def test_alignment_prefers_the_true_prompt(heads, scenes, kind):
    head = heads["ShapesAlignment"]
    rng = np.random.default_rng(5)
    wrong = [one_change(p, kind, rng) for p in scenes["prompts"]]
    with torch.no_grad():
        true_score = head(scenes["images"], scenes["prompts"]).score
        wrong_score = head(scenes["images"], wrong).score
    assert (true_score > wrong_score).float().mean() >= 0.9


def test_weights_are_small():
    files = [WEIGHTS_DIR / "shapes-artifact.safetensors", WEIGHTS_DIR / "shapes-safety.safetensors",
             *(WEIGHTS_DIR / "shapes-alignment").iterdir()]
    assert sum(p.stat().st_size for p in files) <= 5 * 2**20


def test_an_open_clip_folder_from_elsewhere_is_one_line(tmp_path):
    """ShapesAlignment needs the compact vocabulary its trainer writes; another open_clip folder is named as such,
    not a bare KeyError."""
    import json
    import shutil

    from fnf.rewards.shapes import WEIGHTS_DIR

    folder = tmp_path / "other-clip"
    shutil.copytree(WEIGHTS_DIR / "shapes-alignment", folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    del config["fnf_vocab"]
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ShapesAlignment: .*open_clip_config.json has no fnf_vocab; expected a "
                                         r"shapes-world alignment model .* use OpenCLIPAlignment"):
        ShapesAlignment(weights=str(folder))
