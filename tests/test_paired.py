"""fnf.paired and fnf.item_metrics: per-item parts pool to the metrics fnf test reports, and the paired bootstrap
interval of a difference has the width sampling theory gives it."""

from __future__ import annotations

import math

import pytest
import torch

from fnf.item_metrics import squared_error_outside
from fnf.metrics import MaskedPSNR
from fnf.paired import paired_differences
from fnf.report import paired


def rows(defects: list[float], reward: float = 1.0) -> list[dict]:
    return [{"prompt": f"p{i}", "seed": 0, "judge_defect_rate_tuned": d, "reward_tuned/h": reward,
             "outside_sq_error": 1e-4 * (1 + 9 * d), "outside_pixels": 100.0} for i, d in enumerate(defects)]


def test_identical_runs_differ_by_nothing_with_an_interval_of_zero_width():
    a = rows([float(i % 3 == 0) for i in range(50)])
    for difference in paired_differences(a, a):
        assert difference.delta == difference.low == difference.high == 0, difference


@pytest.mark.parametrize("n", [100, 400])
def test_a_rate_difference_gets_the_binomial_width(n):
    """b has a defect on 10% of the items where a has none: the difference is 0.1 and its 95% interval the normal
    approximation's 0.1 ± 1.96·sqrt(0.1·0.9/n) (±0.059 at 100 items, half that at 400), not containing 0."""
    a, b = rows([0.0] * n), rows([float(i < n // 10) for i in range(n)])
    difference = {d.metric: d for d in paired_differences(a, b)}["judge_defect_rate_tuned"]
    half = 1.96 * (0.1 * 0.9 / n) ** 0.5
    assert difference.delta == pytest.approx(0.1)
    assert difference.low == pytest.approx(0.1 - half, abs=0.25 * half)
    assert difference.high == pytest.approx(0.1 + half, abs=0.25 * half)
    assert difference.low > 0


def test_the_interval_is_the_bootstrap_distributions_central_95_percent():
    """The 2.5th and 97.5th percentiles of b − a over the resampled item sets (the same resample for both runs):
    a 90% interval would pass the binomial-width test above, which allows a quarter of the width either way."""
    import numpy as np

    from fnf.paired import DRAWS

    n = 60
    a = rows([float(i % 7 == 0) for i in range(n)])
    b = rows([float(i % 5 == 0) for i in range(n)])
    difference = {d.metric: d for d in paired_differences(a, b, seed=3)}["judge_defect_rate_tuned"]
    per_item = np.array([y["judge_defect_rate_tuned"] - x["judge_defect_rate_tuned"] for x, y in zip(a, b)])
    resampled = per_item[np.random.default_rng(3).integers(n, size=(DRAWS, n))].mean(1)
    assert (difference.low, difference.high) == pytest.approx(tuple(np.quantile(resampled, [0.025, 0.975])))


def test_psnr_pools_the_items_as_the_metric_does():
    """PSNR of the summed parts of each image equals MaskedPSNR over the batch (not the mean of per-image PSNRs)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(6, 3, 16, 16, generator=generator)
    tuned = base + 0.05 * torch.rand(6, 3, 16, 16, generator=generator) * torch.arange(6).view(6, 1, 1, 1)
    mask = (torch.rand(6, 1, 16, 16, generator=generator) > 0.7).float()
    metric = MaskedPSNR(region="outside")
    metric.update(tuned, base, mask)
    error, pixels = squared_error_outside(tuned, base, mask)
    item_rows = [{"prompt": str(i), "seed": 0, "outside_sq_error": e, "outside_pixels": p}
                 for i, (e, p) in enumerate(zip(error.tolist(), pixels.tolist()))]
    same = [dict(row, outside_sq_error=row["outside_sq_error"] * 0.5) for row in item_rows]  # √2 less RMS error
    difference = paired_differences(item_rows, same)[0]
    assert difference.metric == "outside_psnr" and difference.a == pytest.approx(metric.compute().item(), abs=1e-4)
    assert difference.delta == pytest.approx(10 * math.log10(2.0), abs=1e-9)


def test_runs_on_other_items_are_not_paired():
    with pytest.raises(ValueError, match="tested on other items"):
        paired_differences(rows([0.0] * 3), rows([0.0] * 4))
    runs = [{"name": "a", "items": rows([0.0] * 3)}, {"name": "b", "items": rows([0.0] * 4)},
            {"name": "old", "items": None}]
    comparisons = paired(runs)
    assert comparisons["b"].startswith("the runs were tested on other items")
    assert comparisons["old"] == "old has no test_items.jsonl (tested before fnf wrote one)"


def test_the_same_items_in_another_order_are_paired_item_by_item():
    """A test file listing the items in another order: each item is paired with itself, not with its position."""
    a = rows([float(i < 10) for i in range(100)])
    b = rows([float(i < 10) for i in range(100)], reward=2.0)
    shuffled = b[50:] + b[:50]
    assert paired_differences(a, shuffled) == paired_differences(a, b)
    defects = {d.metric: d for d in paired_differences(a, shuffled)}["judge_defect_rate_tuned"]
    assert defects.delta == defects.low == defects.high == 0  # each item against itself: no spread


def test_a_metric_of_no_pixels_is_null_in_json():
    """Every mask covering the whole image: no pixel outside, PSNR of nothing: null (JSON has no NaN), not 200 dB."""
    a = [{"prompt": "p", "seed": 0, "outside_sq_error": 0.0, "outside_pixels": 0.0}]
    (difference,) = paired_differences(a, a)
    assert difference.as_json() == {"metric": "outside_psnr", "a": None, "b": None, "difference": None, "low": None,
                                    "high": None}
