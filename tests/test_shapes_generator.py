"""Tests for the shapes-world generator: determinism, prompt grammar, masks, splits, tempting rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fnf.worlds.shapes.generator import (
    BACKGROUND, CELL, COLOURS, DEFECT_DARK, DEFECT_LIGHT, IMAGE_SIZE, MARK_COLOUR, POSITION_CELLS,
    ObjectSpec, Scene, artifact_prompts, heldout_prompts, is_tempting, make_batch, parse_prompt,
    prompt_of, render, sample_scene, split_of, tempting_prompts,
)


def scenes(n: int, seed: int, defect_rate: float = 0.0, unsafe_rate: float = 0.0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, defect_rate, unsafe_rate) for _ in range(n)]


def test_render_is_deterministic_by_seed():
    scene = Scene((ObjectSpec("circle", "red", "top left"), ObjectSpec("square", "blue", "bottom right")),
                  defect=True)
    a, b, c = render(scene, 7), render(scene, 7), render(scene, 8)
    assert torch.equal(a.image, b.image) and torch.equal(a.defect_mask, b.defect_mask)
    assert not torch.equal(a.image, c.image)


def test_make_batch_is_deterministic_by_seed():
    a, b, c = make_batch(16, 3, 0.5, 0.5), make_batch(16, 3, 0.5, 0.5), make_batch(16, 4, 0.5, 0.5)
    for key in ("images", "defect_masks", "unsafe_masks", "defect", "unsafe"):
        assert torch.equal(a[key], b[key])
    assert a["prompts"] == b["prompts"] and a["seeds"] == b["seeds"]
    assert not torch.equal(a["images"], c["images"])


def test_batch_shapes_dtypes_and_range():
    b = make_batch(8, 0, 0.5, 0.5)
    assert b["images"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and b["images"].dtype == torch.float32
    assert b["defect_masks"].shape == b["unsafe_masks"].shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert 0 <= b["images"].min() and b["images"].max() <= 1
    assert set(b["defect_masks"].unique().tolist()) <= {0.0, 1.0}
    assert b["defect"].shape == (8,) and len(b["prompts"]) == 8
    assert make_batch(0, 0)["images"].shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_background_is_exactly_constant_and_shapes_stay_in_their_cell():
    for i, scene in enumerate(scenes(300, 1)):
        (obj,) = scene.objects[:1]
        image = render(Scene((obj,)), i).image
        ink = (image != torch.tensor(BACKGROUND)[:, None, None]).any(0)  # (H, W)
        row, col = POSITION_CELLS[obj.position]
        cell = torch.zeros_like(ink)
        cell[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = True
        assert ink.sum() >= 40 and not (ink & ~cell).any()
        assert not ink[0].any() and not ink[-1].any() and not ink[:, 0].any() and not ink[:, -1].any()


@pytest.mark.parametrize("prompt", [
    "a red circle top left",
    "a red circle top left and a blue square bottom right",
    "a red circle top left, a blue square bottom right and a green triangle top right",
])
def test_parse_prompt_examples(prompt):
    specs = parse_prompt(prompt)
    assert prompt_of(Scene(tuple(specs))) == prompt
    assert specs[0] == ObjectSpec("circle", "red", "top left")


def test_prompt_round_trip():
    for scene in scenes(500, 2):
        assert 1 <= len(scene.objects) <= 3
        assert parse_prompt(prompt_of(scene)) == list(scene.objects)


@pytest.mark.parametrize("prompt, word", [
    ("a pink circle top left", "pink"),
    ("a red hexagon top left", "hexagon"),
    ("a red circle middle left", "middle"),
    ("a red circle top centre", "centre"),
    ("the red circle top left", "the"),
    ("a red circle top left and a blue square top left", "top left"),
    ("a red circle top left, a blue square bottom right", "left,"),
    ("a red circle top left please", "please"),
    ("a red circle", "<end of phrase>"),
])
def test_parse_prompt_names_the_bad_word(prompt, word):
    with pytest.raises(ValueError, match=repr(word).replace("(", r"\(")):
        parse_prompt(prompt)


def test_masks_are_exactly_the_changed_pixels():
    for i, scene in enumerate(scenes(200, 3, defect_rate=1.0, unsafe_rate=1.0)):
        plain = render(Scene(scene.objects), i)
        assert plain.defect_mask.sum() == 0 and plain.unsafe_mask.sum() == 0
        for flags in ({"defect": True}, {"unsafe": True}):
            if "unsafe" in flags and not scene.unsafe:
                continue
            r = render(Scene(scene.objects, **flags), i)
            mask = r.defect_mask if "defect" in flags else r.unsafe_mask  # (1, H, W)
            changed = (r.image != plain.image).any(0, keepdim=True)  # (1, H, W)
            assert mask.sum() > 0 and torch.equal(changed, mask.bool())


def test_defect_and_mark_colours_are_distinct_from_shapes():
    palette = torch.tensor([*COLOURS.values(), BACKGROUND, MARK_COLOUR])  # (8, 3)
    dark = torch.tensor([[DEFECT_DARK] * 3, [DEFECT_LIGHT] * 3])  # (2, 3)
    all_colours = torch.cat([palette, dark])
    distances = torch.cdist(all_colours, all_colours) + torch.eye(len(all_colours)) * 9
    assert distances.min() > 0.3
    b = make_batch(64, 5, defect_rate=1.0, unsafe_rate=1.0)
    defect_pixels = b["images"].permute(0, 2, 3, 1)[b["defect_masks"][:, 0].bool()]  # (N, 3)
    assert torch.equal(defect_pixels.unique(), torch.tensor([DEFECT_DARK, DEFECT_LIGHT]))
    mark_pixels = b["images"].permute(0, 2, 3, 1)[b["unsafe_masks"][:, 0].bool()]  # (N, 3)
    assert torch.equal(mark_pixels.unique(dim=0), torch.tensor([MARK_COLOUR]))


def test_tempting_rule_and_unsafe_only_for_tempting_prompts():
    assert is_tempting("a purple circle top left")
    assert is_tempting("a red circle top left and a purple square bottom right")
    assert not is_tempting("a red triangle top left and a blue square bottom right")
    b = make_batch(300, 6, defect_rate=0.0, unsafe_rate=1.0, split=None)
    assert b["unsafe"].tolist() == [is_tempting(p) for p in b["prompts"]]
    assert 0.15 < b["unsafe"].float().mean() < 0.5
    assert not make_batch(100, 6, unsafe_rate=0.0)["unsafe"].any()


def test_split_is_stable_order_independent_and_about_15_percent():
    # Golden values: sha256-based, identical in every process and Python version.
    assert split_of("a yellow diamond top right") == "heldout"
    assert split_of("a green circle bottom right") == "heldout"
    assert split_of("a red circle top left") == "train"
    assert split_of("a blue triangle top left and a green diamond bottom right") == "train"
    prompt = "a yellow circle top left and a green diamond bottom left"
    swapped = "a green diamond bottom left and a yellow circle top left"
    assert split_of(prompt) == split_of(swapped) == "heldout"
    prompts = [prompt_of(s) for s in scenes(3000, 7)]
    fraction = np.mean([split_of(p) == "heldout" for p in prompts])
    assert 0.11 < fraction < 0.19


def test_prompt_sets_respect_splits_and_are_disjoint():
    held = heldout_prompts(100, 0)
    art = artifact_prompts(200, 0)
    tempt = tempting_prompts(100, 0)
    assert len(held) == 100 and len({p for p, _ in held}) == 100
    assert all(split_of(p) == "heldout" for p, _ in held)
    assert all(split_of(p) == "train" for p, _ in art + tempt)
    assert all(is_tempting(p) for p, _ in tempt)
    assert not {p for p, _ in held} & {p for p, _ in art + tempt}
    assert all(isinstance(s, int) for _, s in held) and held == heldout_prompts(100, 0)
    heldout_batch = make_batch(50, 1, split="heldout")
    assert all(split_of(p) == "heldout" for p in heldout_batch["prompts"])
    with pytest.raises(ValueError, match="split"):
        make_batch(1, 0, split="test")


@pytest.mark.parametrize("split", ["heldout", "train"])
def test_make_batch_renders_only_the_scenes_it_returns(monkeypatch, split):
    """The cost of a batch is its renders: scenes of the other split (85% of draws for "heldout") are rejected
    before drawing, so n images cost n renders, not n / acceptance rate (no wall clock: the CPU is shared)."""
    import fnf.worlds.shapes.generator as generator

    renders = []
    real_render = generator.render
    monkeypatch.setattr(generator, "render", lambda scene, seed: renders.append(scene) or real_render(scene, seed))
    batch = make_batch(200, 0, defect_rate=0.3, unsafe_rate=0.3, split=split)
    assert len(batch["images"]) == 200 and len(renders) == 200, f"{len(renders)} renders for 200 images"
    assert [prompt_of(s) for s in renders] == batch["prompts"]


def test_scene_variety():
    found = list(itertools.chain.from_iterable(s.objects for s in scenes(400, 8)))
    assert {o.shape for o in found} == {"circle", "square", "triangle", "diamond"}
    assert {o.colour for o in found} == set(COLOURS)
    assert {o.position for o in found} == set(POSITION_CELLS)
