"""Prompt alignment with any open_clip model: the CLIP-score reward (and probe) for real text-to-image models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fnf.device_copies import to_device
from fnf.rewards.base import RewardHead, RewardOutput


class OpenCLIPAlignment(RewardHead):
    """score = scale · (cos(image, prompt) − negative_weight · mean_j cos(image, negative_j)); no heatmap
    (use ``mask: saliency``). Also serves ``fnf.evaluation.Evaluation`` as its CLIP-score / FID model."""

    gives_heatmap = "no"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, negative_prompts: list[str] | None = None,
                 negative_weight: float = 1.0, scale: float = 100.0) -> None:
        """Load an open_clip model.

        Args:
            model: open_clip model name (``ViT-B-32``, ``ViT-H-14``, ...) or ``local-dir:FOLDER`` (a folder with
                ``open_clip_config.json`` and ``open_clip_model.safetensors``).
            pretrained: open_clip pretrained tag (``laion2b_s34b_b79k``; downloaded once, then cached) or a local
                ``.safetensors`` file; None for ``local-dir:`` models.
            negative_prompts: zero-shot probes to move away from (e.g. ["nsfw", "blurry"]).
            negative_weight: weight of the mean negative similarity.
            scale: score multiplier (CLIPScore uses 100).
        """
        import open_clip  # lazily: importing it costs seconds

        super().__init__()
        if pretrained is None and not model.startswith("local-dir:"):
            raise ValueError(f"{self.name}: model {model!r} needs pretrained= (an open_clip tag or a .safetensors "
                             "file); random weights are no reward")
        if pretrained is not None and Path(pretrained).suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise ValueError(f"{self.name}.pretrained: {pretrained} is a pickle file; pass a .safetensors file")
        if pretrained is not None and ("/" in pretrained or pretrained.endswith(".safetensors")) \
                and not Path(pretrained).is_file():  # a path, not a tag: open_clip would log its tag list first
            raise FileNotFoundError(f"{self.name}.pretrained: {pretrained}: "
                                    f"{'a folder' if Path(pretrained).is_dir() else 'no such file'}; expected a "
                                    ".safetensors file or an open_clip tag")
        silenced = logging.root.manager.disable  # open_clip logs a failed download or unknown tag, then raises
        logging.disable(max(silenced, logging.ERROR))
        try:
            self.model = open_clip.create_model(model, pretrained=pretrained, require_pretrained=pretrained is not None)
        except Exception as error:  # unknown name, offline download, corrupt file: one line
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.name}: cannot load open_clip model {model!r} (pretrained={pretrained!r}): "
                             f"{reason}") from None
        finally:
            logging.disable(silenced)
        self.tokenizer = open_clip.get_tokenizer(model)
        preprocess = self.model.visual.preprocess_cfg
        self.image_size = self.model.visual.image_size
        self.register_buffer("mean", torch.tensor(preprocess["mean"])[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"])[None, :, None, None], persistent=False)
        self.negative_prompts, self.negative_weight, self.scale = list(negative_prompts or []), negative_weight, scale
        self.requires_grad_(False).eval()

    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, D); resized (bilinear, differentiable) and normalised like open_clip."""
        size = self.image_size if isinstance(self.image_size, (tuple, list)) else (self.image_size,) * 2
        pixels = F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return self.model.encode_image((pixels - self.mean) / self.std, normalize=normalize)

    def text_features(self, prompts: list[str], normalize: bool = True) -> Tensor:
        return self.model.encode_text(to_device(self.tokenizer(prompts), self.mean.device), normalize=normalize)

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        image = self.image_features(images)
        cosine = (image * self.text_features(prompts)).sum(-1)
        if self.negative_prompts:
            cosine = cosine - self.negative_weight * (image @ self.text_features(self.negative_prompts).T).mean(-1)
        return RewardOutput(score=self.scale * cosine.to(images.dtype))
