"""RAHF heatmap and score metrics (paper Sec. 5; saliency definitions of Bylinskii et al., TPAMI 2018).

Heatmaps, as in the paper and its PyTorch reproduction: MSE over all images (and over those whose ground truth
is empty, ``mse_empty``); CC, KLD, SIM, NSS and AUC-Judd over images with a non-empty ground truth only (they
are undefined or meaningless on an all-zero map). Scores: PLCC and SRCC (torchmetrics' PearsonCorrCoef and
SpearmanCorrCoef). All states sum (or concatenate) across DDP processes.

Functions take (B, H, W) or (B, 1, H, W) maps and return one value per image, computed in float64.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

EPS = 2.220446049250313e-16  # MATLAB eps, the saliency benchmark's regulariser


def _flat(maps: Tensor) -> Tensor:
    return maps.reshape(maps.shape[0], -1).double()  # (B, ...) -> (B, H*W)


def mse(pred: Tensor, gt: Tensor) -> Tensor:
    """Mean squared error per image."""
    return (_flat(pred) - _flat(gt)).square().mean(1)


def cc(pred: Tensor, gt: Tensor) -> Tensor:
    """Pearson correlation coefficient of the two maps' pixels; 0 where either map is constant."""
    p, g = _flat(pred), _flat(gt)
    p, g = p - p.mean(1, keepdim=True), g - g.mean(1, keepdim=True)
    return (p * g).sum(1) / ((p.square().sum(1) * g.square().sum(1)).sqrt() + EPS)


def kld(pred: Tensor, gt: Tensor) -> Tensor:
    """KL(gt || pred) of the maps normalised to sum 1: sum g log(eps + g / (p + eps)); 0 for identical maps."""
    p, g = _flat(pred), _flat(gt)
    p, g = p / (p.sum(1, keepdim=True) + EPS), g / (g.sum(1, keepdim=True) + EPS)
    return (g * torch.log(EPS + g / (p + EPS))).sum(1)


def sim(pred: Tensor, gt: Tensor) -> Tensor:
    """Histogram intersection of the maps normalised to sum 1; 1 for identical maps."""
    p, g = _flat(pred), _flat(gt)
    return torch.minimum(p / (p.sum(1, keepdim=True) + EPS), g / (g.sum(1, keepdim=True) + EPS)).sum(1)


def nss(pred: Tensor, gt: Tensor) -> Tensor:
    """Mean of the standardised prediction (unbiased std, as MATLAB's) over the pixels where gt > 0."""
    p, fixated = _flat(pred), _flat(gt) > 0
    p = (p - p.mean(1, keepdim=True)) / (p.std(1, keepdim=True) + EPS)
    return (p * fixated).sum(1) / fixated.sum(1).clamp_min(1)


def auc_judd(pred: Tensor, gt: Tensor) -> Tensor:
    """AUC-Judd: ROC area where positives are the pixels with gt > 0, thresholds are the prediction at them.

    For each threshold t: TPR = #positives with pred >= t / #positives, FPR = #negatives with pred >= t /
    #negatives; the curve starts at (0, 0), ends at (1, 1), trapezoid rule. Equal values form one threshold (an
    exact ROC) where the MIT code adds 1e-7 random jitter, so this is deterministic; NaN without positives.
    """
    values = []
    for p, g in zip(_flat(pred), _flat(gt) > 0):
        positives = p[g].sort().values  # ascending
        if positives.numel() == 0 or positives.numel() == p.numel():
            values.append(p.new_tensor(float("nan")))
            continue
        thresholds = positives.unique().flip(0)  # descending
        everything = p.sort().values
        above_pos = positives.numel() - torch.searchsorted(positives, thresholds)  # #positives >= t
        above_all = p.numel() - torch.searchsorted(everything, thresholds)  # #pixels >= t
        tpr = above_pos.double() / positives.numel()
        fpr = (above_all - above_pos).double() / (p.numel() - positives.numel())
        zero, one = p.new_zeros(1), p.new_ones(1)
        values.append(torch.trapezoid(torch.cat([zero, tpr, one]), torch.cat([zero, fpr, one])))
    return torch.stack(values)


SALIENCY = {"cc": cc, "kld": kld, "sim": sim, "nss": nss, "auc_judd": auc_judd}


class HeatmapMetrics(Metric):
    """Dataset means of the heatmap metrics; ``compute`` returns ``{"mse", "mse_empty", "cc", "kld", "sim", "nss",
    "auc_judd"}`` (NaN for a group without images). Empty ground truth: max(gt) <= ``empty_below``."""

    full_state_update = False

    def __init__(self, empty_below: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.empty_below = empty_below
        for name in ("mse", "mse_empty", *SALIENCY):  # a sum and a count of the images it is defined on
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, gt: Tensor) -> None:
        pred, gt = pred.detach(), gt.detach()
        empty = _flat(gt).amax(1) <= self.empty_below  # (B,)
        errors = mse(pred, gt)
        self._add("mse", errors)
        self._add("mse_empty", errors[empty])
        if (~empty).any():
            for name, fn in SALIENCY.items():
                values = fn(pred[~empty], gt[~empty])
                self._add(name, values[values.isfinite()])  # AUC-Judd is undefined on an all-positive map

    def _add(self, name: str, values: Tensor) -> None:
        setattr(self, name, getattr(self, name) + values.sum())
        setattr(self, f"{name}_count", getattr(self, f"{name}_count") + values.numel())

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name in ("mse", "mse_empty", *SALIENCY):
            total, count = getattr(self, name), getattr(self, f"{name}_count")
            out[name] = (total / count if count > 0 else torch.full_like(total, float("nan"))).float()
        return out


def score_metrics(names: tuple[str, ...]) -> nn.ModuleDict:
    """``{score name: MetricCollection(plcc=PearsonCorrCoef, srcc=SpearmanCorrCoef)}``; update with (pred, target).

    SRCC keeps every prediction until ``compute`` (ranks need them all): about 1K per RichHF-18K split, so its
    "large memory footprint" warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*will save all targets and predictions in the buffer.*")
        return nn.ModuleDict({name: MetricCollection({"plcc": PearsonCorrCoef(), "srcc": SpearmanCorrCoef()})
                              for name in names})
