"""Give any scalar reward head a heatmap of what lowers its score: gradient saliency or Grad-CAM (safety masks)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fnf.masks import blur, clear_clean_images, peak_normalised, saliency_heatmap
from fnf.rewards.base import RewardHead, RewardOutput, heatmap_wanted, scores_only


class Saliency(RewardHead):
    """Wraps ``head``: same score; heatmap = where the image *lowers* the score, peak-normalised per image.

    Scores are "higher is better", so the region to fix is the evidence against the score.
    ``method: gradcam`` is Grad-CAM of the negated score: the activations of ``layer`` (a module name inside
    ``head``) weighted by their mean gradient of −score, ReLU, upsampled -- the "counterfactual" map of
    Selvaraju et al. 2017 (negated gradients). Grad-CAM of the score itself marks what makes the image good,
    not the problem (ShapesSafety: on the mark in 0 of 8 unsafe scenes). ``method: gradient`` is
    |∂score/∂pixel| (max over channels): sign-free, it marks where a change moves the score, which on a
    low-scoring image is the problem (the paper's masks for scalar safety classifiers).

    Peak normalisation makes every nonzero heatmap reach 1, so gradient-saliency masks are never empty;
    ``clean_score`` is the absolute test: images scoring at or above it have nothing to fix and get an
    all-zero heatmap, whatever the method.
    """

    gives_heatmap = "yes"

    def __init__(self, head: RewardHead, method: Literal["gradient", "gradcam"] = "gradient", layer: str | None = None,
                 sigma: float = 1.0, clean_score: float | None = None) -> None:
        """Turn a scalar reward head into a heatmap head.

        Args:
            head: the scalar reward head (any RewardHead; its own heatmap is ignored).
            method: gradient saliency or Grad-CAM (of −score).
            layer: Grad-CAM only: name of a conv-like module of ``head`` (as in ``head.named_modules()``),
                usually the last convolutional feature map (ShapesSafety: ``net.body.6``).
            sigma: Gaussian smoothing of the heatmap in pixels (0: none).
            clean_score: a score at or above which an image has nothing to fix: its heatmap is all zero, so
                its mask is empty and ``model.masks.empty`` (keep / skip / global) decides. In the wrapped
                head's units (ShapesSafety: −log 2 ≈ −0.69: its top-k pixels' mean softplus(logit) below that
                of an even-odds pixel). None: no absolute test, so gradient saliency reaches 1 on every image
                and its masks are never empty (Grad-CAM is all zero where no activation counts against the
                score).
        """
        super().__init__()
        if method not in ("gradient", "gradcam"):
            raise ValueError(f"Saliency.method must be 'gradient' or 'gradcam', got {method!r}")
        if method == "gradcam" and layer not in dict(head.named_modules()):
            raise ValueError(f"Saliency.layer: {layer!r} is not a module of {head.name}; "
                             f"choose one of {[n for n, _ in head.named_modules() if n][:10]}...")
        if method == "gradient" and layer is not None:
            raise ValueError(f"Saliency.layer is for method gradcam only, got layer={layer!r} with method gradient")
        if sigma < 0:
            raise ValueError(f"Saliency.sigma must be >= 0, got {sigma}")
        if clean_score is not None and not math.isfinite(clean_score):
            raise ValueError(f"Saliency.clean_score must be a finite score or null, got {clean_score}")
        self.head, self.method, self.layer, self.sigma, self.clean_score = head, method, layer, sigma, clean_score

    @property
    def name(self) -> str:
        return f"{self.head.name}+{self.method}"

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        with scores_only():
            score = self.head(images, prompts).score
        if not heatmap_wanted():  # the tuned pass: no gradient pass for a heatmap nobody reads
            return RewardOutput(score=score)
        with torch.no_grad():
            if self.method == "gradient":
                heatmap = saliency_heatmap(self.head, images, prompts, self.sigma)
            else:
                heatmap = self._gradcam(images, prompts)
            heatmap = clear_clean_images(heatmap, score, self.clean_score)
        return RewardOutput(score=score, heatmap=heatmap)

    def _gradcam(self, images: Tensor, prompts: list[str]) -> Tensor:
        captured = []
        hook = dict(self.head.named_modules())[self.layer].register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            with torch.inference_mode(False), torch.enable_grad():  # Lightning validates/tests in inference mode
                with scores_only():
                    score = self.head(images.detach().clone().requires_grad_(True), prompts).score
                (gradient,) = torch.autograd.grad(-score.sum(), captured[0])  # evidence against the score
        finally:
            hook.remove()
        activation = captured[0].detach()  # (B, C, h, w)
        weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): Grad-CAM's channel importances
        cam = F.relu((weights * activation).sum(1, keepdim=True))  # (B, 1, h, w)
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return peak_normalised(blur(cam, self.sigma) if self.sigma > 0 else cam).clamp(0, 1)
