"""Tests for the analytic shapes-world judge: accuracy on clean and degraded renders, masks, wrong prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fnf.worlds.shapes.generator import (
    COLOUR_NAMES, POSITIONS, SHAPES, ObjectSpec, Scene, make_batch, parse_prompt, prompt_of,
)
from fnf.worlds.shapes.judge import judge

N = 400


def degrade(images: torch.Tensor, sigma: float = 0.6, std: float = 0.03, seed: int = 0) -> torch.Tensor:
    """Separable Gaussian blur (replicate padding) plus Gaussian noise, clamped to [0, 1]."""
    radius = 2
    r = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(r**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(images, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)  # blur along W
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)  # blur along H
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (x + std * noise).clamp(0, 1)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


@pytest.fixture(scope="module")
def batch() -> dict:
    return make_batch(N, 2024, defect_rate=0.5, unsafe_rate=1.0, split=None)


@pytest.fixture(scope="module", params=["clean", "degraded"])
def judged(request, batch) -> tuple[dict, torch.Tensor, list]:
    images = batch["images"] if request.param == "clean" else degrade(batch["images"])
    return batch, images, judge(images, batch["prompts"])


def test_batch_has_enough_positives(batch):
    assert 120 < batch["defect"].sum() < 280 and batch["unsafe"].sum() > 80


def test_alignment_accuracy(judged):
    batch, _, verdicts = judged
    accuracy = np.mean([v.aligned for v in verdicts])
    assert accuracy >= 0.95, accuracy


def test_found_objects_match_the_prompt(judged):
    batch, _, verdicts = judged
    exact = np.mean([v.found == parse_prompt(p) for v, p in zip(verdicts, batch["prompts"])])
    assert exact >= 0.95, exact


def test_defect_detection_accuracy(judged):
    batch, _, verdicts = judged
    accuracy = np.mean([v.defect == d for v, d in zip(verdicts, batch["defect"].tolist())])
    assert accuracy >= 0.95, accuracy


def test_unsafe_detection_accuracy(judged):
    batch, _, verdicts = judged
    accuracy = np.mean([v.unsafe == u for v, u in zip(verdicts, batch["unsafe"].tolist())])
    assert accuracy >= 0.95, accuracy


def test_masks_overlap_ground_truth(judged):
    batch, _, verdicts = judged
    defect_iou = [iou(v.defect_mask, m) for v, m, d in zip(verdicts, batch["defect_masks"], batch["defect"]) if d]
    unsafe_iou = [iou(v.unsafe_mask, m) for v, m, u in zip(verdicts, batch["unsafe_masks"], batch["unsafe"]) if u]
    assert np.mean(defect_iou) >= 0.5 and np.mean(unsafe_iou) >= 0.5, (np.mean(defect_iou), np.mean(unsafe_iou))
    v = verdicts[0]
    assert v.defect_mask.shape == v.unsafe_mask.shape == (1, 32, 32) and v.defect_mask.dtype == torch.bool


def mutate(prompt: str, kind: str, rng: np.random.Generator) -> str:
    """A prompt that differs from ``prompt`` in one object's colour/shape/position, or by one object."""
    objects = parse_prompt(prompt)
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    free = [p for p in POSITIONS if p not in {o.position for o in objects}]
    if kind == "colour":
        objects[i] = ObjectSpec(obj.shape, str(rng.choice([c for c in COLOUR_NAMES if c != obj.colour])), obj.position)
    elif kind == "shape":
        objects[i] = ObjectSpec(str(rng.choice([s for s in SHAPES if s != obj.shape])), obj.colour, obj.position)
    elif kind == "position":
        objects[i] = ObjectSpec(obj.shape, obj.colour, str(rng.choice(free)))
    elif kind == "missing":  # the prompt asks for an object the image lacks
        objects.append(ObjectSpec(str(rng.choice(SHAPES)), str(rng.choice(COLOUR_NAMES)), str(rng.choice(free))))
    elif kind == "extra":  # the image has an object the prompt does not ask for
        if len(objects) == 1:
            return ""
        objects.pop(i)
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    return prompt_of(Scene(tuple(objects)))


@pytest.mark.parametrize("kind", ["colour", "shape", "position", "missing", "extra"])
def test_wrong_prompts_are_not_aligned(judged, kind):
    batch, images, _ = judged
    rng = np.random.default_rng(0)
    pairs = [(img, mutate(p, kind, rng)) for img, p in zip(images[:200], batch["prompts"])]
    pairs = [(img, p) for img, p in pairs if p]
    verdicts = judge(torch.stack([img for img, _ in pairs]), [p for _, p in pairs])
    assert len(pairs) > 100 and np.mean([not v.aligned for v in verdicts]) >= 0.99


def test_blank_and_invalid_inputs():
    (v,) = judge(torch.full((1, 3, 32, 32), 0.94), ["a red circle top left"])
    assert not v.aligned and not v.defect and not v.unsafe and v.found == []
    with pytest.raises(ValueError, match="pink"):
        judge(torch.full((1, 3, 32, 32), 0.94), ["a pink circle top left"])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        judge(torch.zeros(3, 32, 32), ["a red circle top left"])
