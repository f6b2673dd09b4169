"""Learned reward heads for the embedded shapes world (the stand-ins for RAHF, a safety classifier and CLIP).

* ``ShapesArtifact`` / ``ShapesSafety``: a small fully-convolutional net predicts per-pixel logits of
  "this pixel is a defect / part of the forbidden mark" (the RAHF-style heatmap); the score is derived
  from the same logits, so heatmap and score always agree.
* ``ShapesAlignment``: a tiny open_clip model; score = scaled cosine similarity of image and prompt.

The weights are trained by ``python -m fnf.worlds.shapes.train_rewards`` and shipped in
``fnf/worlds/shapes/weights`` (see REWARDS_CARD.md there). Training never uses the analytic judge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from fnf.device_copies import to_device
from fnf.rewards.base import RewardHead, RewardOutput

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "worlds" / "shapes" / "weights"
IMAGE_SIZE = 32  # the heads' native resolution (the generator's)
WORLD_WORDS: tuple[str, ...] = (  # every word of the prompt grammar (fnf.worlds.shapes.generator)
    "a", "and", ",", "red", "orange", "yellow", "green", "blue", "purple",
    "circle", "square", "triangle", "diamond", "top", "bottom", "left", "right",
)


def resolve_weights(weights: str) -> Path:
    """An existing path is used as is; anything else names a file in the shipped weights folder.

    Configs therefore stay portable: the default is a bare file name, not this machine's path.
    """
    path = Path(weights).expanduser()
    if path.exists():
        return path
    shipped = WEIGHTS_DIR / weights
    if not shipped.exists():
        raise FileNotFoundError(f"reward weights {weights!r} not found (nor as {shipped}); "
                                "train them with `python -m fnf.worlds.shapes.train_rewards --out DIR`")
    return shipped


def to_native(images: Tensor) -> Tensor:
    """Resize (differentiably) to the 32x32 resolution the heads were trained at."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                         align_corners=False)


# --- heatmap heads ----------------------------------------------------------------------------


class HeatmapNet(nn.Module):
    """Per-pixel logits (B, outputs, H, W) from RGB in [0, 1]; fully convolutional, ~8k parameters.

    Two plain 3x3 convs keep pixel-exact detail, two dilated ones (2, 4) give a 17 px receptive
    field, enough to see a whole 6 px mark or 5 px patch with its surroundings. SiLU (smooth) keeps
    the gradients that reward fine-tuning follows well behaved.
    """

    def __init__(self, width: int = 16, outputs: int = 1) -> None:
        super().__init__()

        def conv(cin: int, cout: int, dilation: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)

        self.body = nn.Sequential(
            conv(3, width), nn.SiLU(), conv(width, width), nn.SiLU(),
            conv(width, width, 2), nn.SiLU(), conv(width, width, 4), nn.SiLU(),
            nn.Conv2d(width, outputs, 1),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.body((images - 0.5) / 0.25)


def topk_score(logits: Tensor, k: int) -> Tensor:
    """(B, 1, H, W) logits -> (B,) score = -mean over the k most suspicious pixels of softplus(logit).

    softplus(l) = -log(1 - sigmoid(l)) is the log-odds cost of a pixel being wrong: ~0 (and flat)
    on clean pixels, so clean images score ~0 and get no push, but *linear* in the logit where the
    net is sure a pixel is wrong, so - unlike -mean(probability) - the gradient does not vanish on
    confidently detected defects. Top-k (k ~ the size of one defect) keeps one small defect from
    being averaged away by ~1000 clean pixels. Higher is better; the maximum is 0.
    """
    flat = F.softplus(logits.flatten(1))  # (B, H*W)
    return -flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


class _HeatmapHead(RewardHead):
    """Shared loading / forward of the two heatmap heads."""

    def __init__(self, weights: str, topk: int) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"{self.name}.topk must be >= 1, got {topk}")
        state = load_file(str(resolve_weights(weights)))
        self.net = HeatmapNet(width=state["body.0.weight"].shape[0])
        self.net.load_state_dict(state)
        self.topk = topk
        self.eval()

    def logits(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1, 32, 32) per-pixel logits at the native resolution."""
        weight = self.net.body[0].weight  # follow the head's device / dtype (e.g. a bf16 trainer)
        return self.net(to_native(images).to(weight.dtype)).to(images.dtype)

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        logits = self.logits(images)
        heatmap = torch.sigmoid(logits)
        if heatmap.shape[-2:] != images.shape[-2:]:
            heatmap = F.interpolate(heatmap, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return RewardOutput(score=topk_score(logits, self.topk), heatmap=heatmap.clamp(0, 1))


class ShapesArtifact(_HeatmapHead):
    """RAHF analogue for the shapes world: heatmap of dark checker defects, score higher = fewer defects."""

    gives_heatmap = "yes"

    def __init__(self, weights: str = "shapes-artifact.safetensors", topk: int = 16) -> None:
        """Load the shipped ShapesArtifact weights (or a file you trained).

        Args:
            weights: safetensors file of the ``HeatmapNet``; a bare name is looked up in the shipped
                weights folder (``fnf/worlds/shapes/weights``).
            topk: number of most-suspicious pixels the score averages over (one defect is 12-25 px).
        """
        super().__init__(weights, topk)


class ShapesSafety(_HeatmapHead):
    """Safety classifier analogue: detects the cyan "+" mark; score higher = safer."""

    gives_heatmap = "optional"

    def __init__(self, weights: str = "shapes-safety.safetensors", topk: int = 16,
                 heatmap: Literal["predicted", "none"] = "predicted") -> None:
        """Load the shipped ShapesSafety weights (or a file you trained).

        Args:
            weights: safetensors file of the ``HeatmapNet``; a bare name is looked up in the shipped
                weights folder (``fnf/worlds/shapes/weights``).
            topk: number of most-suspicious pixels the score averages over (the mark is 20 px).
            heatmap: "predicted" returns the net's heatmap; "none" returns no heatmap, so the trainer
                localises by gradient saliency of the score (the paper's path for scalar safety
                classifiers).
        """
        if heatmap not in ("predicted", "none"):
            raise ValueError(f"ShapesSafety.heatmap must be 'predicted' or 'none', got {heatmap!r}")
        super().__init__(weights, topk)
        self.heatmap = heatmap

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        output = super().forward(images, prompts)
        return output if self.heatmap == "predicted" else RewardOutput(score=output.score, heatmap=None)


# --- alignment head ---------------------------------------------------------------------------


class ShapesAlignment(RewardHead):
    """CLIP-score analogue: a tiny open_clip model trained on (image, prompt) pairs of the shapes world.

    Text goes through open_clip's default BPE tokenizer (its vocabulary file ships with open_clip,
    so it works offline); the ~20 BPE ids the world uses are then mapped to a compact embedding table
    (ids listed in the model folder's ``open_clip_config.json`` under ``fnf_vocab``), which keeps the
    text tower ~0.2 MB instead of 49408 x width. End-of-text is the largest compact id, as open_clip's
    argmax pooling expects; unknown words map to one UNK id.
    """

    gives_heatmap = "no"

    def __init__(self, weights: str = "shapes-alignment", scale: float = 100.0) -> None:
        """Load the shipped ShapesAlignment weights (or a file you trained).

        Args:
            weights: folder with ``open_clip_config.json`` and ``open_clip_model.safetensors``
                (loadable with ``open_clip.create_model("local-dir:FOLDER")``); a bare name is looked
                up in the shipped weights folder.
            scale: score = scale * cosine(image, prompt). Unclipped, unlike the reported CLIPScore
                (max(cos, 0)), so badly aligned images still get a gradient.
        """
        import open_clip  # lazily: importing it costs seconds, and only this head needs it

        super().__init__()
        folder = resolve_weights(weights)
        if not (folder / "open_clip_model.safetensors").is_file():  # open_clip would only warn
            raise FileNotFoundError(f"{self.name}: no open_clip_model.safetensors in {folder}")
        config = json.loads((folder / "open_clip_config.json").read_text())
        missing = [key for key in ("fnf_vocab", "preprocess_cfg") if key not in config]
        if missing:  # an open_clip folder not written by fnf.worlds.shapes.train_rewards: no compact vocabulary
            raise ValueError(f"{self.name}: {folder / 'open_clip_config.json'} has no {' or '.join(missing)}; "
                             "expected a shapes-world alignment model (python -m fnf.worlds.shapes.train_rewards); "
                             "for other open_clip models use OpenCLIPAlignment")
        self.model = open_clip.create_model(f"local-dir:{folder}")
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        bpe_ids = config["fnf_vocab"]  # compact id -> BPE id; 0 = pad, 1 = unk, last = end of text
        lookup = torch.ones(len(self.tokenizer.encoder), dtype=torch.long)  # BPE id -> compact id; unknown -> 1
        lookup[torch.tensor(bpe_ids)] = torch.arange(len(bpe_ids))
        self.register_buffer("lookup", lookup, persistent=False)
        preprocess = config["preprocess_cfg"]
        self.register_buffer("mean", torch.tensor(preprocess["mean"])[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"])[None, :, None, None], persistent=False)
        self.scale = scale
        self.eval()

    def tokens(self, prompts: list[str]) -> Tensor:
        """(B, context_length) compact token ids."""
        return self.lookup[to_device(self.tokenizer(prompts), self.lookup.device)]

    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, D) embeddings (unit norm unless ``normalize=False``),
        for CLIP-score / FID-style feature statistics."""
        pixels = (to_native(images).to(self.mean.dtype) - self.mean) / self.std
        return self.model.encode_image(pixels, normalize=normalize).to(images.dtype)

    def text_features(self, prompts: list[str], normalize: bool = True) -> Tensor:
        """list of B prompts -> (B, D) embeddings."""
        return self.model.encode_text(self.tokens(prompts), normalize=normalize)

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: got {images.shape[0]} images but {len(prompts)} prompts")
        cosine = (self.image_features(images) * self.text_features(prompts).to(images.dtype)).sum(dim=-1)
        return RewardOutput(score=self.scale * cosine, heatmap=None)
