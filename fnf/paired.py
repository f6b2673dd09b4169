"""Two runs tested on the same items (prompt, seed), compared item by item: each metric's difference, run b − run a,
with a 95% paired bootstrap interval over the items.

Both runs are resampled with the same draw of items, so what they share (prompts, x_T, base images) moves both
sides alike and the interval reflects how the difference varies with the items drawn: with 100 test prompts a
rate differs by a few points from one draw to the next, which a table of means alone does not show. The rows are
``test_items.jsonl`` (fnf.item_metrics); a metric is pooled as ``fnf test`` pools it: rates and rewards are means
over items, PSNR is 10·log10 of the pixel count over the summed squared error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fnf.scan_file import row_key

DRAWS = 2000


@dataclass(frozen=True)
class Difference:
    metric: str
    a: float
    b: float
    low: float
    high: float
    """The 2.5% and 97.5% quantiles of b − a over bootstrap draws of the items."""

    @property
    def delta(self) -> float:
        return self.b - self.a

    def as_json(self) -> dict:
        """Its fields and the difference, a number of nothing (NaN: no pixel outside the masks) as null."""
        values = {"metric": self.metric, "a": self.a, "b": self.b, "difference": self.delta, "low": self.low,
                  "high": self.high}
        return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in values.items()}


def _means(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    return values[draws].mean(axis=-1)


def _psnr(error: np.ndarray, pixels: np.ndarray, draws: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # no pixel outside the masks: NaN, no number (as MaskedPSNR)
        mean = error[draws].sum(axis=-1) / pixels[draws].sum(axis=-1)
    return 10 * np.log10(1 / np.maximum(mean, 1e-20))  # identical images: 200 dB, as MaskedPSNR


def pooled_metrics(rows: list[dict]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """metric -> f(draws) giving its value for each draw (a (D, N) array of item indices; all items: (N,)).
    numpy, not torch: ``fnf report`` starts without importing torch."""
    def column(key: str) -> np.ndarray:
        return np.array([float(row[key]) for row in rows], dtype=np.float64)

    keys = [key for key in rows[0] if all(key in row for row in rows)]
    metrics = {key: (lambda draws, v=column(key): _means(v, draws)) for key in keys
               if key.startswith("reward_tuned/") or key.endswith("_tuned")}
    for prefix in ("", "reference_"):
        if f"{prefix}outside_sq_error" in keys:
            error, pixels = column(f"{prefix}outside_sq_error"), column(f"{prefix}outside_pixels")
            metrics[f"{prefix}outside_psnr"] = lambda draws, e=error, p=pixels: _psnr(e, p, draws)
    return metrics


def aligned(a: list[dict], b: list[dict]) -> list[dict]:
    """``b``'s rows in ``a``'s item order (a test file may list the same items in another order); other items, or
    repeated items in another order, cannot be paired."""
    keys_a, keys_b = [row_key(row) for row in a], [row_key(row) for row in b]
    if keys_a == keys_b:
        return b
    by_key = dict(zip(keys_b, b))
    if len(by_key) != len(b) or len(set(keys_a)) != len(a) or set(keys_a) != set(by_key):
        raise ValueError("the runs were tested on other items (prompt, seed); a paired comparison needs the same")
    return [by_key[key] for key in keys_a]


def paired_differences(a: list[dict], b: list[dict], draws: int = DRAWS, seed: int = 0) -> list[Difference]:
    """Every metric both runs have, b − a with its 95% interval, over the items both were tested on."""
    b = aligned(a, b)
    if not a:
        return []
    metrics_a, metrics_b = pooled_metrics(a), pooled_metrics(b)
    everything = np.arange(len(a))
    resampled = np.random.default_rng(seed).integers(len(a), size=(draws, len(a)))
    differences = []
    for metric in [m for m in metrics_a if m in metrics_b]:
        value_a, value_b = float(metrics_a[metric](everything)), float(metrics_b[metric](everything))
        spread = metrics_b[metric](resampled) - metrics_a[metric](resampled)
        spread = spread[np.isfinite(spread)]
        low, high = np.quantile(spread, [0.025, 0.975]).tolist() if len(spread) else (math.nan, math.nan)
        differences.append(Difference(metric, value_a, value_b, low, high))
    return differences
