"""Prompt alignment with any open_clip model: the CLIP-score reward (and probe) for real text-to-image models."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fnf.device_copies import to_device
from fnf.rewards.base import WEIGHTS_HOWTO, RewardHead, RewardOutput


class OpenCLIPAlignment(RewardHead):
    """score = scale · (cos(image, prompt) − negative_weight · mean_j cos(image, negative_j)); no heatmap
    (use ``mask: saliency``). Also serves ``fnf.evaluation.Evaluation`` as its CLIP-score / FID model."""

    gives_heatmap = "no"

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None, negative_prompts: list[str] | None = None,
                 negative_weight: float = 1.0, scale: float = 100.0, tag: str | None = None) -> None:
        """Load an open_clip model.

        Args:
            model: open_clip model name (``ViT-B-32``, ``ViT-H-14``, ...) or ``local-dir:FOLDER`` (a folder with
                ``open_clip_config.json`` and ``open_clip_model.safetensors``).
            pretrained: open_clip pretrained tag (``laion2b_s34b_b79k``; downloaded once, then cached) or a local
                ``.safetensors`` file; None for ``local-dir:`` models.
            negative_prompts: zero-shot probes to move away from (e.g. ["nsfw", "blurry"]).
            negative_weight: weight of the mean negative similarity.
            scale: score multiplier (CLIPScore uses 100).
            tag: for a local ``.safetensors`` file, the open_clip tag its weights were published as: the file
                takes that tag's preprocessing (mean, std, resize) and activation (QuickGELU for OpenAI's and
                MetaCLIP's weights). Required where the model's tags differ in those (open_clip would silently use
                its defaults for a file).
        """
        import open_clip  # lazily: importing it costs seconds

        super().__init__()
        if pretrained is None and not model.startswith(("local-dir:", "hf-hub:")):  # those name their weights
            raise ValueError(f"{self.name}: model {model!r} needs pretrained= (an open_clip tag or a .safetensors "
                             "file); random weights are no reward")
        if pretrained is not None and Path(pretrained).suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise ValueError(f"{self.name}.pretrained: {pretrained} is a pickle file; pass a .safetensors file")
        if pretrained is not None and ("/" in pretrained or pretrained.endswith(".safetensors")) \
                and not Path(pretrained).is_file():  # a path, not a tag: open_clip would log its tag list first
            raise FileNotFoundError(f"{self.name}.pretrained: {pretrained}: "
                                    f"{'a folder' if Path(pretrained).is_dir() else 'no such file'}; expected a "
                                    ".safetensors file or an open_clip tag")
        local_file = pretrained is not None and Path(pretrained).is_file()
        if tag is not None and not local_file:  # a tag as pretrained, or a local-dir: / hf-hub: model, brings its own
            raise ValueError(f"{self.name}.tag is read only with a local .safetensors file as pretrained; remove it")
        published = local_file_settings(open_clip, model, tag, self.name) if local_file else {}
        silenced = logging.root.manager.disable  # open_clip logs a failed download or unknown tag, then raises
        logging.disable(max(silenced, logging.ERROR))
        try:
            self.model = open_clip.create_model(model, pretrained=pretrained, require_pretrained=pretrained is not None,
                                                **published)
        except Exception as error:  # unknown name, offline download, corrupt file: one line
            reason = " ".join(str(error).split()) or type(error).__name__
            reason = reason if len(reason) <= 240 else reason[:240].rsplit(" ", 1)[0] + " ..."
            offline = (f"; without the hub, pass the weights as a file, pretrained: <file>.safetensors with tag: "
                       f"{pretrained}; {WEIGHTS_HOWTO}" if pretrained is not None and not local_file
                       and "download" in reason.lower() else "")
            raise ValueError(f"{self.name}: cannot load open_clip model {model!r} (pretrained={pretrained!r}): "
                             f"{reason}{offline}") from None
        finally:
            logging.disable(silenced)
        self.tokenizer = open_clip.get_tokenizer(model)
        preprocess = self.model.visual.preprocess_cfg
        self.image_size = self.model.visual.image_size
        self.interpolation = preprocess.get("interpolation", "bicubic")
        self.resize_mode = preprocess.get("resize_mode", "shortest")
        if self.interpolation not in ("bicubic", "bilinear") or self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"{self.name}: {model} preprocesses with {self.interpolation} interpolation and resize "
                             f"mode {self.resize_mode}; supported: bicubic or bilinear, shortest or squash")
        self.register_buffer("mean", torch.tensor(preprocess["mean"])[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"])[None, :, None, None], persistent=False)
        self.negative_prompts, self.negative_weight, self.scale = list(negative_prompts or []), negative_weight, scale
        self.requires_grad_(False).eval()

    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, D); resized and normalised as open_clip's eval transform does
        (its interpolation, antialiased; shortest: the short side to the model's size, then the centre; squash:
        both sides), but differentiable."""
        height, width = self.image_size if isinstance(self.image_size, (tuple, list)) else (self.image_size,) * 2
        h, w = images.shape[-2:]
        size = (height, width)
        if self.resize_mode == "shortest" and h * width != w * height:  # torchvision's Resize(side) / ResizeKeepRatio
            ratio = max(height / h, width / w)
            size = ((height, int(height * w / h)) if h <= w else (int(width * h / w), width)) if height == width \
                else (round(h * ratio), round(w * ratio))
        pixels = F.interpolate(images.float(), size=size, mode=self.interpolation, align_corners=False, antialias=True)
        top, left = int(round((size[0] - height) / 2)), int(round((size[1] - width) / 2))  # torchvision's CenterCrop
        pixels = pixels[..., top:top + height, left:left + width]
        return self.model.encode_image((pixels - self.mean) / self.std, normalize=normalize)

    def text_features(self, prompts: list[str], normalize: bool = True) -> Tensor:
        return self.model.encode_text(to_device(self.tokenizer(prompts), self.mean.device), normalize=normalize)

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        image = self.image_features(images)
        cosine = (image * self.text_features(prompts)).sum(-1)
        if self.negative_prompts:
            cosine = cosine - self.negative_weight * (image @ self.text_features(self.negative_prompts).T).mean(-1)
        return RewardOutput(score=self.scale * cosine.float())


PUBLISHED = ("mean", "std", "interpolation", "resize_mode")
"""A pretrained tag's preprocessing settings (open_clip's pretrained configs)."""


def local_file_settings(open_clip, model: str, tag: str | None, name: str) -> dict:
    """``create_model`` arguments for weights from a local file: open_clip gives a file its defaults (OpenAI's mean
    and std, GELU), right only for some tags; ``tag`` names the one the file holds. Without it, the model's tags
    must agree (or it has none)."""
    tags = open_clip.list_pretrained_tags_by_model(model)
    configs = {t: open_clip.get_pretrained_cfg(model, t) for t in tags}
    settings = {t: (tuple((key, config.get(key)) for key in PUBLISHED), bool(config.get("quick_gelu")))
                for t, config in configs.items()}
    if tag is not None and tag not in settings:
        raise ValueError(f"{name}.tag: {model} has no pretrained tag {tag!r}; its tags: {tags}")
    if tag is None and len(set(settings.values())) > 1:
        raise ValueError(f"{name}.tag: a local file for {model} needs the tag its weights were published as (its "
                         f"tags differ in preprocessing or QuickGELU: {tags}); set tag")
    if not settings:
        return {}
    preprocess, quick_gelu = settings[tag if tag is not None else tags[0]]
    return {"force_preprocess_cfg": {key: value for key, value in preprocess if value is not None},
            "force_quick_gelu": quick_gelu}
