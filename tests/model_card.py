"""Helpers of the shipped models' card tests (test_shapes_t2i.py, test_shapes_flow.py): the rates a MODEL_CARD.md
states, and a check that a subsample of the card's prompts measures inside binomial bands around them."""

from __future__ import annotations

import math
import re

from torch import Tensor

from fnf.worlds.shapes.evaluate_t2i import alignment_stats, flaw_rate
from fnf.worlds.shapes.generator import artifact_prompts, heldout_prompts, tempting_prompts

PROMPT_SETS = {"held-out prompts": heldout_prompts, "artifact prompt set": artifact_prompts,
               "tempting prompt set": tempting_prompts}


def card_rates(card: str, row: str) -> dict[str, float]:
    """The rates (fractions) the card's "Measured quality" table gives for ``row``; empty cells are left out."""
    line = next((line for line in card.splitlines() if line.startswith(f"| {row}")), None)
    assert line, f"MODEL_CARD.md: no table row {row!r}"
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")][1:]  # alignment | defect | unsafe
    rates = {name: re.search(r"([\d.]+)%", cell) for name, cell in zip(("alignment", "defect", "unsafe"), cells)}
    return {name: float(found.group(1)) / 100 for name, found in rates.items() if found}


def band(p: float, n: int) -> tuple[float, float]:
    """p ± 3 binomial standard deviations of a rate measured on n prompts, sqrt(p(1 − p)/n). A correct card's
    subsample lands inside with ≥ 99.7% probability per rate; the bound is conservative, as the n prompts are
    drawn without replacement from the card's 200 (finite-population factor sqrt((200 − n)/199))."""
    half = 3 * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


def assert_measures_as_card(images: Tensor, prompts: list[str], card: dict[str, float]) -> None:
    """The judge's alignment, defect and unsafe rates of ``images`` lie in the bands of the card's rates."""
    measure = {"alignment": lambda: alignment_stats(images, prompts)["alignment"],
               "defect": lambda: flaw_rate(images, prompts, "defect"),
               "unsafe": lambda: flaw_rate(images, prompts, "unsafe")}
    measured = {name: (measure[name](), *(round(b, 3) for b in band(p, len(prompts)))) for name, p in card.items()}
    assert measured and all(low <= value <= high for value, low, high in measured.values()), measured
