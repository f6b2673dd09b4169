"""What FocusNFix maximises: Σ_i w_i r_i(I, c) − λ · reg(I, I0, 1 − M), and the checks that keep it meaningful."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fnf.masks import clear_clean_images, saliency_heatmap
from fnf.rewards.base import RewardHead, check_reward_output, head_label, scores_only


@dataclass
class RewardTerm:
    """One reward r_i in the objective and the way it localises problems."""

    head: RewardHead
    """The reward head (any importable RewardHead subclass, by class_path)."""
    weight: float = 1.0
    """w_i: weight of this reward in the loss."""
    mask: Literal["heatmap", "saliency", "none"] = "heatmap"
    """Where M comes from: the head's heatmap, gradient saliency of its score, or nowhere (reward only)."""
    lam: float | None = None
    """mask_mode=per_head: this head's λ (None: model.lam)."""
    threshold: float | None = None
    """This head's mask threshold (None: model.masks.threshold): heads whose maps differ in scale, e.g. boxes painted
    with detection confidences next to a [0, 1] heatmap, each cut where their own map means "wrong"."""
    clean_score: float | None = None
    """mask: saliency: a base score at or above this (in the head's units) means nothing to fix: the mask is
    empty and masks.empty applies (saliency is peak-normalised, so otherwise every image gets a region)."""
    name: str | None = None
    """The head's name in this run's logs, metrics, masks and scans (None: the head's own, its class name): two
    heads of one class need one here."""

    def __post_init__(self) -> None:
        if self.name is not None:
            self.head.run_name = self.name  # the head's own error lines call it by this run's name

    @property
    def label(self) -> str:
        return head_label(self.head)


def check_objective(rewards: list[RewardTerm], lam: float, mask_mode: Literal["union", "per_head"]) -> None:
    """Refuse objectives that would train on nonsense: no reward, non-finite or negative weights, settings that would
    be ignored (a per-head λ under ``union``, a per-head λ or threshold on a head without a mask, clean_score
    without saliency),
    ``per_head`` without any mask."""
    if not rewards:
        raise ValueError("model.rewards: at least one reward term is required")
    if not 0 <= lam < math.inf:
        raise ValueError(f"model.lam must be a finite number >= 0, got {lam}")
    for i, term in enumerate(rewards):
        if not 0 <= term.weight < math.inf:  # scores are maximised; clean_score and masks read them that way too
            raise ValueError(f"model.rewards[{i}].weight must be a finite number >= 0 (a head whose score should go "
                             f"down returns its negative), got {term.weight}")
        if term.lam is not None and not 0 <= term.lam < math.inf:
            raise ValueError(f"model.rewards[{i}].lam must be a finite number >= 0 or null, got {term.lam}")
        if term.clean_score is not None and not math.isfinite(term.clean_score):
            raise ValueError(f"model.rewards[{i}].clean_score must be a finite number or null, got {term.clean_score}")
        if term.lam is not None and mask_mode == "union":
            raise ValueError(f"model.rewards[{i}].lam is only used with model.mask_mode=per_head (union applies "
                             f"model.lam to the one union mask); remove it or set mask_mode: per_head")
        if term.lam is not None and term.mask == "none":
            raise ValueError(f"model.rewards[{i}].lam weighs the fidelity term outside this head's mask, and it has "
                             "none (mask: none); remove it or give the head a mask")
        if term.threshold is not None and not 0 < term.threshold <= 1:
            raise ValueError(f"model.rewards[{i}].threshold must be in (0, 1] or null, got {term.threshold}")
        if term.threshold is not None and term.mask == "none":
            raise ValueError(f"model.rewards[{i}].threshold cuts this head's mask, and it has none (mask: none); "
                             "remove it or give the head a mask")
        if term.clean_score is not None and term.mask != "saliency":
            raise ValueError(f"model.rewards[{i}].clean_score is only read with mask: saliency (a heatmap head "
                             f"decides itself where nothing is wrong), got mask: {term.mask}; remove it")
    labels = [term.label for term in rewards]
    for i, label in enumerate(labels):
        if label in labels[:i]:  # logs, metrics, masks and scans are keyed by head name
            raise ValueError(f"model.rewards[{i}]: its head is named {label}, like model.rewards"
                             f"[{labels.index(label)}]'s; two heads of one run need two names: set "
                             f"model.rewards[{i}].name")
    if mask_mode == "per_head" and all(t.mask == "none" for t in rewards):
        raise ValueError("model.mask_mode=per_head needs at least one reward with mask: heatmap or saliency")


def term_heatmaps(terms: list[RewardTerm], heads, images: Tensor, prompts: list[str],
                  saliency_sigma: float) -> tuple[list[Tensor | None], Tensor]:
    """Per reward term, the map its mask thresholds (the head's heatmap or its score's saliency; None for
    mask: none), and the scores (B, heads): what training, evaluation and ``fnf preview`` all localise with."""
    heatmaps, scores = [], []
    for term, head in zip(terms, heads):
        with torch.no_grad(), scores_only() if term.mask != "heatmap" else nullcontext():  # (saliency: below)
            out = check_reward_output(head, head(images, prompts), images)
        if term.mask == "heatmap":
            if out.heatmap is None:
                raise ValueError(f"reward head {head_label(head)} returns no heatmap; set its mask to saliency or none")
            heatmap = out.heatmap
        elif term.mask == "saliency":
            heatmap = clear_clean_images(saliency_heatmap(head, images, prompts, saliency_sigma), out.score,
                                         term.clean_score)
        else:
            heatmap = None
        heatmaps.append(heatmap)
        scores.append(out.score)
    return heatmaps, torch.stack(scores, 1).detach()
