"""Fidelity terms: zero when nothing changed outside the mask, the paper's formula, no gradient inside."""

from __future__ import annotations

import pytest
import torch

from fnf.regularizers import LatentFrobenius, NoRegularizer, PixelFrobenius
from fnf.sampling import Sample


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = Sample(torch.rand(2, 4, 4, 4, generator=g), torch.rand(2, 3, 8, 8, generator=g))
    keep = torch.ones(2, 1, 8, 8)
    keep[:, :, 2:6, 2:6] = 0  # the mask M: a 4×4 square that may change
    return base, keep


def test_pixel_is_zero_when_only_the_masked_region_changes():
    base, keep = _pair()
    images = base.images.clone()
    images[:, :, 2:6, 2:6] = torch.rand(2, 3, 4, 4)
    value = PixelFrobenius()(Sample(base.latents, images), base, keep)
    assert value.shape == (2,) and torch.equal(value, torch.zeros(2))


def test_pixel_matches_the_unsquared_frobenius_norm_per_image():
    base, keep = _pair()
    tuned = Sample(base.latents, torch.rand(2, 3, 8, 8))
    expected = torch.stack([((keep[i] * (tuned.images[i] - base.images[i])) ** 2).sum().sqrt() for i in range(2)])
    torch.testing.assert_close(PixelFrobenius()(tuned, base, keep), expected)


def test_pixel_weighs_a_soft_masks_band_by_its_value():
    """masks.kind: soft fades the mask out: a pixel kept at 0.5 counts half its change, not a quarter (keep²)."""
    base, keep = _pair()
    keep[:, :, :, 6:] = 0.5  # a feathered band
    tuned = Sample(base.latents, base.images + 0.1)
    weights = torch.ones(8, 8)  # per pixel, what its change counts
    weights[2:6, 2:6] = 0
    weights[:, 6:] = 0.5
    expected = (3 * (0.1 * weights) ** 2).sum().sqrt()
    torch.testing.assert_close(PixelFrobenius()(tuned, base, keep), expected.repeat(2))


@pytest.mark.parametrize("regularizer", [PixelFrobenius(), LatentFrobenius()])
def test_gradient_is_zero_inside_the_mask(regularizer):
    base, keep = _pair()
    keep = torch.nn.functional.interpolate(keep, size=(4, 4), mode="nearest")  # mask aligned with latent cells
    keep = torch.nn.functional.interpolate(keep, size=(8, 8), mode="nearest")
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    latents = torch.rand(2, 4, 4, 4, requires_grad=True)
    regularizer(Sample(latents, images), base, keep).sum().backward()
    grad, inside = (images.grad, keep == 0) if regularizer.__class__ is PixelFrobenius else (latents.grad, keep[:, :, ::2, ::2] == 0)
    assert grad.abs().sum() > 0
    assert torch.equal(grad * inside, torch.zeros_like(grad))


@pytest.mark.parametrize("regularizer", [PixelFrobenius(), LatentFrobenius()])
def test_bf16_samples_get_the_float32_penalty_of_their_values(regularizer):
    """Decoded images and masks are bf16 under bf16-mixed: the norm is still summed and returned in float32."""
    base, keep = _pair()
    tuned = Sample(base.latents + torch.rand(2, 4, 4, 4), base.images + torch.rand(2, 3, 8, 8))
    half = [Sample(s.latents.bfloat16(), s.images.bfloat16()) for s in (tuned, base)]
    exact = regularizer(*[Sample(s.latents.float(), s.images.float()) for s in half], keep.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        penalty = regularizer(*half, keep.bfloat16())
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, exact, rtol=1e-6, atol=0)


def test_gradient_at_identity_is_zero_not_nan():
    base, keep = _pair()
    images = base.images.clone().requires_grad_(True)
    PixelFrobenius()(Sample(base.latents, images), base, keep).sum().backward()
    assert torch.equal(images.grad, torch.zeros_like(images))


def test_latent_uses_the_area_resized_mask():
    """Each latent cell is kept by the fraction of its 2×2 pixels outside the mask: a mask edge across a cell
    counts half (a hole off the latent grid, so nearest-neighbour resizing would differ)."""
    base, _ = _pair()
    keep = torch.ones(2, 1, 8, 8)
    keep[:, :, 1:5, 1:5] = 0  # its edges cut through latent cells
    tuned = Sample(base.latents + 1.0, base.images)
    keep_latent = keep.reshape(2, 1, 4, 2, 4, 2).mean(dim=(3, 5))  # the mean over each cell's pixels
    assert set(keep_latent.unique().tolist()) == {0.0, 0.5, 0.75, 1.0}
    expected = (keep_latent.expand(-1, 4, -1, -1) ** 2).sum(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(LatentFrobenius()(tuned, base, keep), expected)


def test_none_is_zero():
    base, keep = _pair()
    assert torch.equal(NoRegularizer()(Sample(base.latents, torch.rand(2, 3, 8, 8)), base, keep), torch.zeros(2))
