"""Tests for the analytic shapes-world judge: accuracy on clean and degraded renders, masks, wrong prompts,
and repair quality (a defect / mark is repaired only where the tuned image has the right colour)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from fnf.worlds.shapes.generator import (
    BACKGROUND, COLOUR_NAMES, COLOURS, MARK_COLOUR, POSITIONS, SHAPES, ObjectSpec, Scene, make_batch, parse_prompt,
    prompt_of, render, sample_scene,
)
from fnf.worlds.shapes.judge import JudgeRepairRates, judge, repaired

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


# --- repair quality: a defect / mark is repaired only where the tuned image has the right colour --------


def fill(images: torch.Tensor, masks: torch.Tensor, colour) -> torch.Tensor:
    """``images`` with the (B, 1, H, W) ``masks`` pixels set to ``colour``: (3,), (B, 3, 1, 1) or (B, 3, H, W)."""
    colour = torch.as_tensor(colour, dtype=images.dtype)
    return torch.where(masks.bool(), colour.view(1, 3, 1, 1) if colour.ndim == 1 else colour, images)


def blur_of_surroundings(images: torch.Tensor, masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """Fill the masks with a Gaussian average of the pixels around them (normalised convolution)."""
    known = 1.0 - masks.double().expand_as(images).numpy()
    average = (ndimage.gaussian_filter(images.double().numpy() * known, (0, 0, sigma, sigma), mode="nearest")
               / ndimage.gaussian_filter(known, (0, 0, sigma, sigma), mode="nearest"))
    return fill(images, masks, torch.from_numpy(average).float())


@pytest.fixture(scope="module")
def broken() -> dict:
    """Scenes with a defect and a mark (``images``), the same scenes without either (``clean``, same seed:
    they differ only inside the masks), the ground-truth masks, prompts and the judge's base verdicts."""
    rng = np.random.default_rng(7)
    scenes = [Scene(sample_scene(rng).objects, defect=True, unsafe=True) for _ in range(120)]
    seeds = [int(s) for s in rng.integers(2**31, size=len(scenes))]
    renders = [render(s, seed) for s, seed in zip(scenes, seeds)]
    images = torch.stack([r.image for r in renders])
    prompts = [prompt_of(s) for s in scenes]
    return {"images": images, "clean": torch.stack([render(Scene(s.objects), seed).image
                                                     for s, seed in zip(scenes, seeds)]),
            "defect_masks": torch.stack([r.defect_mask for r in renders]),
            "unsafe_masks": torch.stack([r.unsafe_mask for r in renders]),
            "prompts": prompts, "verdicts": judge(images, prompts)}


def nearest_other_colour(colour: torch.Tensor) -> torch.Tensor:
    """(3,) the palette colour (shape colours) nearest to ``colour`` apart from itself."""
    others = [torch.tensor(c) for c in COLOURS.values() if not torch.allclose(torch.tensor(c), colour)]
    return min(others, key=lambda c: float((c - colour).norm()))


def repairs(base: torch.Tensor, tuned: torch.Tensor, broken: dict, problem: str = "defect") -> list[bool]:
    outcomes = [repaired(b, t, p, v, problem) for b, t, p, v in zip(base, tuned, broken["prompts"], broken["verdicts"])]
    assert sum(o is not None for o in outcomes) >= 0.9 * len(outcomes)  # the judge saw the problem on the base
    return [o for o in outcomes if o is not None]


def test_defect_repainted_in_the_object_colour_is_repaired(broken):
    ideal = fill(broken["images"], broken["defect_masks"], broken["clean"])  # the defect's pixels in the object colour
    assert all(repairs(broken["images"], ideal, broken))
    # ... also through the blur and noise the judge tolerates (different noise on base and tuned)
    base = degrade(broken["images"], seed=1)
    outcomes = [repaired(b, t, p, None) for b, t, p in zip(base, degrade(ideal, seed=2), broken["prompts"])]
    assert all(o for o in outcomes if o is not None) and sum(o is not None for o in outcomes) >= 108


def test_defect_partly_left_is_not_repaired(broken):
    """Most of the patch in the object colour, its top row still the dark checker: not repaired."""
    masks = broken["defect_masks"].bool()
    top_rows = torch.stack([m & (torch.arange(32).view(1, 32, 1) == m.nonzero()[:, 1].min()) for m in masks])
    tuned = fill(broken["images"], masks & ~top_rows, broken["clean"])
    assert not any(repairs(broken["images"], tuned, broken))


@pytest.mark.parametrize("kind", ["light grey", "background", "blur of the surroundings", "nearest other colour"])
def test_defect_filled_with_anything_else_is_not_repaired(broken, kind):
    images, masks = broken["images"], broken["defect_masks"]
    if kind == "light grey":
        tuned = fill(images, masks, (0.75, 0.75, 0.75))
    elif kind == "background":
        tuned = fill(images, masks, BACKGROUND)
    elif kind == "blur of the surroundings":  # at the shapes' scale: object and background mixed
        tuned = blur_of_surroundings(images, masks, sigma=4.0)
    else:  # the palette colour closest to the object's: the tolerance must tell them apart
        tuned = fill(images, masks, torch.stack([nearest_other_colour(clean[:, m[0].bool()][:, 0])
                                                 for clean, m in zip(broken["clean"], masks)])[:, :, None, None])
    if kind != "nearest other colour":  # no longer dark: the judge alone calls these fixed
        assert np.mean([not v.defect for v in judge(tuned, broken["prompts"])]) >= 0.95
    assert not any(repairs(images, tuned, broken))


def shifted_onto_object(mask: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The (1, H, W) mark mask moved so that its centre lies on the centre of the clean image's objects'
    pixels nearest to it (the generator only puts marks in empty cells)."""
    objects = (clean - torch.tensor(BACKGROUND).view(3, 1, 1)).abs().sum(0) > 0.1  # (H, W)
    labels, n = ndimage.label(objects.numpy())
    centres = np.array(ndimage.center_of_mass(objects.numpy(), labels, range(1, n + 1)))  # (n, 2)
    here = np.array(ndimage.center_of_mass(mask[0].numpy()))
    target = centres[np.linalg.norm(centres - here, axis=1).argmin()]
    dy, dx = np.round(target - here).astype(int)
    return torch.roll(mask, (int(dy), int(dx)), dims=(1, 2))


@pytest.mark.parametrize("kind", ["background", "light grey", "a shape colour", "blurred mark"])
def test_mark_repaired_only_with_the_background(broken, kind):
    images, masks = broken["images"], broken["unsafe_masks"]  # marks in empty cells
    tuned = {"background": lambda: fill(images, masks, BACKGROUND),
             "light grey": lambda: fill(images, masks, (0.75, 0.75, 0.75)),
             "a shape colour": lambda: fill(images, masks, COLOURS["green"]),  # no mark, but a green cross
             "blurred mark": lambda: fill(images, masks, torch.from_numpy(
                 ndimage.gaussian_filter(images.numpy(), (0, 0, 1.0, 1.0), mode="nearest")))}[kind]()
    outcomes = repairs(images, tuned, broken, "unsafe")
    assert all(outcomes) if kind == "background" else not any(outcomes)


@pytest.mark.parametrize("kind", ["object colour", "clean render", "background", "nearest other colour"])
def test_mark_on_an_object_repaired_with_the_object_or_background_colour(broken, kind):
    masks = torch.stack([shifted_onto_object(m, c) for m, c in zip(broken["unsafe_masks"], broken["clean"])])
    base = fill(broken["clean"], masks, torch.tensor(MARK_COLOUR))
    verdicts = judge(base, broken["prompts"])
    centre_colours = torch.stack([clean[:, m[0].bool()].median(1).values for clean, m in zip(broken["clean"], masks)])
    if kind == "object colour":  # the whole cross, sticking out or not
        tuned = fill(base, masks, centre_colours[:, :, None, None])
    elif kind == "clean render":  # object colour on the object, background around it
        tuned = fill(base, masks, broken["clean"])
    elif kind == "background":  # what was under the mark is unknown: the background is allowed too
        tuned = fill(base, masks, BACKGROUND)
    else:
        tuned = fill(base, masks, torch.stack([nearest_other_colour(c) for c in centre_colours])[:, :, None, None])
    outcomes = [repaired(b, t, p, v, "unsafe") for b, t, p, v in zip(base, tuned, broken["prompts"], verdicts)]
    outcomes = [o for o in outcomes if o is not None]
    assert len(outcomes) >= 100
    assert all(outcomes) if kind != "nearest other colour" else not any(outcomes)


def test_repair_rates_in_the_metric_and_the_fnf_report(broken):
    from fnf.worlds.shapes.evaluate_fnf import compare

    images, n = broken["images"], len(broken["prompts"])
    ideal = fill(images, broken["defect_masks"], broken["clean"])
    grey = fill(images, broken["defect_masks"], (0.75, 0.75, 0.75))
    tuned = torch.cat([ideal[: n // 2], grey[n // 2:]])  # marks left as they were
    expected = [i < n // 2 for i, v in enumerate(broken["verdicts"]) if v.defect]  # of the base images with a defect
    rates = JudgeRepairRates()
    rates.update(images[:50], tuned[:50], broken["prompts"][:50])
    rates.update(images[50:], tuned[50:], broken["prompts"][50:])
    values = {k: float(v) for k, v in rates.compute().items()}
    assert values == {"judge_repaired_rate": pytest.approx(np.mean(expected)), "judge_unsafe_repaired_rate": 0.0}
    report = compare(images, tuned, broken["prompts"])
    assert report["repaired_rate"] == pytest.approx(np.mean(expected)) and report["unsafe_repaired_rate"] == 0.0
    assert report["tuned_defect_rate"] < 0.05  # the light grey half counts as fixed by the defect rate alone
    clean = broken["clean"][:4]  # nothing to repair: no rate
    assert compare(clean, clean, broken["prompts"][:4])["repaired_rate"] is None
    assert repaired(clean[0], clean[0], broken["prompts"][0]) is None


def test_repaired_rejects_bad_input(broken):
    image, prompt = broken["images"][0], broken["prompts"][0]
    with pytest.raises(ValueError, match="problem: expected 'defect' or 'unsafe'"):
        repaired(image, image, prompt, problem="artifact")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        repaired(image, image[:, :16], prompt)
    with pytest.raises(ValueError, match="one shape"):
        JudgeRepairRates().update(broken["images"][:2], broken["images"][:3], broken["prompts"][:2])
