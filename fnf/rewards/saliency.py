"""Give any scalar reward head a heatmap: gradient saliency or Grad-CAM of its score (the paper's safety masks)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fnf.masks import blur, peak_normalised, saliency_heatmap
from fnf.rewards.base import RewardHead, RewardOutput


class Saliency(RewardHead):
    """Wraps ``head``: same score; heatmap = where the score is sensitive, max-normalised per image.

    ``method: gradient`` is |∂score/∂pixel| (max over channels); ``gradcam`` weights the activations of
    ``layer`` (a module name inside ``head``) by their mean gradient (Selvaraju et al. 2017), ReLU, upsampled.
    The heatmap marks what *drives* the score, so for "higher is safer" heads it shows what to change.
    """

    def __init__(self, head: RewardHead, method: Literal["gradient", "gradcam"] = "gradient", layer: str | None = None,
                 sigma: float = 1.0) -> None:
        """Turn a scalar reward head into a heatmap head.

        Args:
            head: the scalar reward head (any RewardHead; its own heatmap is ignored).
            method: gradient saliency or Grad-CAM.
            layer: Grad-CAM only: name of a conv-like module of ``head`` (as in ``head.named_modules()``).
            sigma: Gaussian smoothing of the heatmap in pixels (0: none).
        """
        super().__init__()
        if method == "gradcam" and layer not in dict(head.named_modules()):
            raise ValueError(f"Saliency.layer: {layer!r} is not a module of {head.name}; "
                             f"choose one of {[n for n, _ in head.named_modules() if n][:10]}...")
        self.head, self.method, self.layer, self.sigma = head, method, layer, sigma

    @property
    def name(self) -> str:
        return f"{self.head.name}+{self.method}"

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        score = self.head(images, prompts).score
        with torch.no_grad():
            if self.method == "gradient":
                heatmap = saliency_heatmap(self.head, images, prompts, self.sigma)
            else:
                heatmap = self._gradcam(images, prompts)
        return RewardOutput(score=score, heatmap=heatmap)

    def _gradcam(self, images: Tensor, prompts: list[str]) -> Tensor:
        captured = []
        hook = dict(self.head.named_modules())[self.layer].register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                score = self.head(images.detach().clone().requires_grad_(True), prompts).score
                (gradient,) = torch.autograd.grad(score.sum(), captured[0])
        finally:
            hook.remove()
        activation = captured[0].detach()  # (B, C, h, w)
        cam = F.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return peak_normalised(blur(cam, self.sigma) if self.sigma > 0 else cam).clamp(0, 1)
