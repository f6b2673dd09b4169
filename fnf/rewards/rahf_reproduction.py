"""RAHF in the layout of the public PyTorch reproduction (github.com/youweiliang/RichHF), to run its checkpoint.

That reproduction of Rich Human Feedback (Liang et al., CVPR 2024) is built from Hugging Face models:

    image (B, 3, S, S) in [-1, 1] -> ViTModel (google/vit-large-patch16-384) tokens, CLS first (B, 1 + g*g, Dv)
    -> linear -> (B, 1 + g*g, D);  prompt -> T5 ids -> T5 token embeddings (B, L, D)
    -> T5 encoder (t5-base) over the concatenation -> patch tokens (CLS dropped) as a map (B, D, g, g)
    -> heatmap heads (convs, 4 x (3x3 2x up-conv + residual conv pair), convs, sigmoid): implausibility, misalignment
    -> score heads (6 convs, MLP 512-128-1, sigmoid): plausibility, alignment, aesthetics, overall

This module is written from the RAHF paper and from the checkpoint's tensor names and shapes; it contains none
of the reproduction's code (PolyForm Noncommercial). Its released weights are CC BY-NC 4.0: non-commercial use
only. They are a pickled state dict: ``fnf rahf-convert`` (fnf/rahf/convert.py) turns them into ``.safetensors``
once; this module reads only that. Parity with the reproduction's own outputs: tests/test_rahf_reproduction.py.

Deliberate differences from running the reproduction: prompt padding is masked (the reproduction attends to it in
batches of unequal-length prompts), so each item equals its batch-of-one output; images are resized by
differentiable antialiased bilinear interpolation (its processor: PIL bilinear on uint8); the T5 decoder, which
generates misaligned keywords, is not loaded (a reward needs heatmaps and scores).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fnf.device_copies import to_device
from fnf.rewards.base import RewardHead, RewardOutput
from fnf.rewards.rahf import HEATMAPS, SCORES, RAHFOutput, check_state, read_safetensors

CONFIG_KEY = "fnf.rahf_reproduction.config"  # safetensors metadata key holding ReproductionConfig as JSON


@dataclass(frozen=True)
class ReproductionConfig:
    """Sizes; ``fnf rahf-convert`` reads them off a checkpoint's tensor shapes."""

    vit: dict = field(default_factory=dict)
    """transformers.ViTConfig arguments (the public checkpoint: google/vit-large-patch16-384's)."""
    t5: dict = field(default_factory=dict)
    """transformers.T5Config arguments (the public checkpoint: t5-base's)."""
    heatmap_stem: tuple[int, int] = (768, 384)
    """Channels of the heatmap heads' two first convs."""
    heatmap_ups: tuple[int, ...] = (768, 384, 384, 192)
    """Channels of the heatmap heads' 2x up-convolutions (one entry per doubling)."""
    heatmap_last: int = 192
    """Channels of the heatmap heads' last hidden conv."""
    heatmaps: tuple[str, ...] = HEATMAPS
    scores: tuple[str, ...] = SCORES


class ChannelScale(nn.Module):
    """T5-style norm over the channels of a (B, C, h, w) map: x / rms(x) * scale; no mean, no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8) * self.scale


def conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class HeatmapPredictor(nn.Module):
    """(B, D, g, g) -> (B, 1, g·2^n, g·2^n) in [0, 1]. Attribute names and Sequential indices are the checkpoint's."""

    def __init__(self, width: int, stem: tuple[int, int], ups: tuple[int, ...], last: int) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(conv3(width, stem[0]), nn.ReLU(), ChannelScale(stem[0]),
                                         conv3(stem[0], stem[1]), nn.ReLU(), ChannelScale(stem[1]))
        self.deconv_layers, self.conv_layers2 = nn.ModuleList(), nn.ModuleList()
        for cin, cout in zip((stem[1],) + tuple(ups), ups):
            self.deconv_layers.append(nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1), ChannelScale(cout), nn.ReLU()))
            self.conv_layers2.append(nn.Sequential(conv3(cout, cout), ChannelScale(cout), nn.ReLU(),
                                                   conv3(cout, cout), ChannelScale(cout)))
        self.last_conv1, self.last_conv2 = conv3(ups[-1], last), conv3(last, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_layers(x)
        for up, refine in zip(self.deconv_layers, self.conv_layers2):
            x = up(x)
            x = F.relu(x + refine(x))
        return torch.sigmoid(self.last_conv2(F.relu(self.last_conv1(x))))


class ScorePredictor(nn.Module):
    """(B, D, g, g) -> (B,) in [0, 1]: six conv-norm-ReLU layers narrowing D to D/64, then an MLP."""

    def __init__(self, width: int, grid: int) -> None:
        super().__init__()
        channels = [width, width, width // 2, width // 4, width // 8, width // 16, width // 64]
        layers = []
        for cin, cout in zip(channels, channels[1:]):
            layers += [conv3(cin, cout), ChannelScale(cout), nn.ReLU()]
        self.conv_layers = nn.Sequential(*layers)
        self.linear_layers = nn.Sequential(nn.Linear(channels[-1] * grid * grid, 512), nn.ReLU(), nn.Linear(512, 128),
                                           nn.ReLU(), nn.Linear(128, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_layers(self.conv_layers(x).flatten(1)).squeeze(1)


class RAHFReproduction(nn.Module):
    """The reproduction's multi-head RAHF; ``forward`` takes images in [0, 1] of any size and T5 token ids."""

    def __init__(self, config: ReproductionConfig) -> None:
        from transformers import T5Config, T5EncoderModel, ViTConfig, ViTModel  # lazily: imports cost seconds

        super().__init__()
        self.config = config
        self.vit = ViTModel(ViTConfig(**config.vit), add_pooling_layer=False)
        self.t5 = T5EncoderModel(T5Config(**config.t5))
        vit, width = self.vit.config, self.t5.config.d_model
        if vit.image_size % vit.patch_size or width < 128:  # a norm over 1 channel is ±1: no gradient
            raise ValueError(f"RAHF reproduction sizes: ViT image_size {vit.image_size} must be a multiple of "
                             f"patch_size {vit.patch_size}, and T5 d_model {width} at least 128 (the score heads "
                             f"end in D/64 channels)")
        self.grid = vit.image_size // vit.patch_size
        self.visual_token_projection = nn.Linear(vit.hidden_size, width)
        heatmap_sizes = (config.heatmap_stem, config.heatmap_ups, config.heatmap_last)
        self.heatmap_predictor = nn.ModuleDict({name: HeatmapPredictor(width, *heatmap_sizes)
                                                for name in config.heatmaps})
        self.score_predictor = nn.ModuleDict({name: ScorePredictor(width, self.grid) for name in config.scores})

    def features(self, images: Tensor, token_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """images (B, 3, H, W) in [0, 1], token_ids (B, L), attention_mask (B, L) -> fused patch map (B, D, g, g)."""
        size = (self.vit.config.image_size,) * 2
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        visual = self.visual_token_projection(self.vit(pixel_values=images * 2 - 1).last_hidden_state)  # google ViT
        text = self.t5.get_input_embeddings()(token_ids)  # (B, L, D), unscaled, as T5 does
        keep = torch.ones(token_ids.shape, dtype=torch.long, device=token_ids.device) if attention_mask is None \
            else attention_mask.long()
        keep = torch.cat([keep.new_ones(visual.shape[:2]), keep], 1)
        fused = self.t5(inputs_embeds=torch.cat([visual, text], 1), attention_mask=keep).last_hidden_state
        patches = fused[:, 1:visual.shape[1]]  # (B, g*g, D): CLS dropped
        return patches.transpose(1, 2).reshape(len(patches), -1, self.grid, self.grid)

    def forward(self, images: Tensor, token_ids: Tensor, attention_mask: Tensor | None = None,
                heatmaps: tuple[str, ...] = HEATMAPS, scores: tuple[str, ...] = SCORES) -> RAHFOutput:
        """Only the named heads run (a reward needs one heatmap and one score)."""
        features = self.features(images, token_ids, attention_mask)
        return RAHFOutput({name: self.heatmap_predictor[name](features) for name in heatmaps},
                          {name: self.score_predictor[name](features) for name in scores})


def load_reproduction(path: str | Path) -> RAHFReproduction:
    """Build the model from a ``.safetensors`` file written by ``fnf rahf-convert`` (sizes in its metadata)."""
    state, metadata = read_safetensors(path, "RAHF reproduction weights", " (fnf rahf-convert writes one from the "
                                       "public reproduction's model.pt)")
    if CONFIG_KEY not in metadata:
        raise ValueError(f"RAHF reproduction weights {path}: no {CONFIG_KEY} metadata; convert the checkpoint with "
                         f"`fnf rahf-convert`")
    try:
        config = ReproductionConfig(**{key: tuple(value) if isinstance(value, list) else value
                                       for key, value in json.loads(metadata[CONFIG_KEY]).items()})
    except (ValueError, TypeError) as error:
        raise ValueError(f"RAHF reproduction weights {path}: bad {CONFIG_KEY} metadata ({error})") from None
    if "t5.shared.weight" in state:  # one tensor in the model, stored once (save_reproduction)
        state["t5.encoder.embed_tokens.weight"] = state["t5.shared.weight"]
    with torch.device("meta"):  # no random init of the ~500M weights the file replaces (8 s at full size)
        model = RAHFReproduction(config)
    check_state(model, state, f"RAHF reproduction weights {path}")
    model.load_state_dict(state, assign=True)
    return model


def save_reproduction(model: RAHFReproduction, path: str | Path) -> None:
    """Write ``model`` as ``.safetensors`` with its sizes in the metadata; atomically."""
    from safetensors.torch import save_file

    from fnf.files import atomic_path

    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    state.pop("t5.encoder.embed_tokens.weight")  # tied to t5.shared.weight (safetensors refuses shared storage)
    with atomic_path(path) as staging:
        save_file(state, str(staging), metadata={CONFIG_KEY: json.dumps(asdict(model.config))})


class RAHFReproductionHeatmap(RewardHead):
    """The public RAHF reproduction's checkpoint as a reward: one of its scores and one of its heatmaps.

    Same choices as ``RAHFHeatmap`` (implausibility + plausibility: artifacts; misalignment + alignment).
    """

    gives_heatmap = "yes"

    def __init__(self, weights: str, tokenizer: str,
                 heatmap: Literal["implausibility", "misalignment"] = "implausibility",
                 score: Literal["plausibility", "alignment", "aesthetics", "overall"] = "plausibility") -> None:
        """Load converted weights and the T5 tokenizer.

        Args:
            weights: ``.safetensors`` written by ``fnf rahf-convert`` from the reproduction's ``.pt``.
            tokenizer: folder (or hub id in the local cache) of the T5 tokenizer the checkpoint was trained
                with: t5-base's for the public checkpoint.
            heatmap: which predicted heatmap becomes the reward's heatmap.
            score: which predicted score becomes the reward.
        """
        super().__init__()
        from transformers import AutoTokenizer

        self.model = load_reproduction(weights)
        for choice, name, known in ((heatmap, "heatmap", self.model.config.heatmaps),
                                    (score, "score", self.model.config.scores)):
            if choice not in known:
                raise ValueError(f"{self.name}.{name}: {choice!r} is not one of {known}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as error:  # missing folder, not in the offline cache, no tokenizer files
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(f"{self.name}.tokenizer: cannot load a tokenizer from {tokenizer!r}; pass a local "
                             f"folder with t5-base's tokenizer files ({reason})") from None
        self.heatmap, self.score = heatmap, score
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        text = {name: to_device(ids, images.device) for name, ids in
                self.tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True).items()}
        output = self.model(images.float(), text["input_ids"], text["attention_mask"], heatmaps=(self.heatmap,),
                            scores=(self.score,))
        heatmap = output.heatmaps[self.heatmap]
        if heatmap.shape[-2:] != images.shape[-2:]:
            heatmap = F.interpolate(heatmap, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return RewardOutput(score=output.scores[self.score].to(images.dtype), heatmap=heatmap.to(images.dtype))
