"""RAHF (Liang et al., CVPR 2024, "Rich Human Feedback for Text-to-Image Generation", arXiv 2312.10240).

The paper's model, multi-head variant, built from plain PyTorch blocks so any size trains from scratch:

    image (B, 3, S, S) -> ViT patch tokens (B, g*g, Dv) -> linear -> (B, g*g, D)
    prompt -> open_clip BPE ids (B, L) -> embedding (+ optional text transformer) -> (B, L, D)
    concat -> fusion transformer (self-attention over image + text tokens, the paper's T5 encoder)
    fused image tokens -> (B, D, g, g) -> heatmap decoders (conv, 2x up-convs, sigmoid): implausibility, misalignment
                                       -> score heads (conv, MLP, sigmoid): plausibility, alignment, aesthetics, overall

Every output is in [0, 1]. Scores: higher is better. Heatmaps: high where the image is implausible / misaligned.
Deviations, all documented: absolute learned positions instead of T5 relative bias; no keyword (sequence)
head; the tokenizer is open_clip's (its BPE vocabulary ships inside the wheel, so it works offline with no setup,
where a T5 sentencepiece model would need a download or a local folder).

Weights are ``.safetensors`` written by ``fnf rahf-train fit`` (their metadata carries the sizes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fnf.device_copies import to_device
from fnf.rewards.base import WEIGHTS_HOWTO, RewardHead, RewardOutput

HEATMAPS = ("implausibility", "misalignment")
SCORES = ("plausibility", "alignment", "aesthetics", "overall")
VOCAB_SIZE, EOT = 49408, 49407  # open_clip SimpleTokenizer
CONFIG_KEY = "fnf.rahf.config"  # safetensors metadata key holding RAHFConfig as JSON
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class RAHFConfig:
    """RAHF sizes. Defaults are the paper's ViT-B/16 + T5-base shape at 224 px; tests use a few-k-parameter one."""

    image_size: int = 224
    """Side of the square input in pixels (images are resized to it); a multiple of patch_size."""
    patch_size: int = 16
    """ViT patch side in pixels; the token grid is image_size / patch_size on a side."""
    vision_width: int = 768
    """ViT token width."""
    vision_layers: int = 12
    """ViT transformer blocks."""
    vision_heads: int = 12
    """ViT attention heads (must divide vision_width)."""
    context_length: int = 77
    """Prompt tokens kept (longer prompts are cut)."""
    text_layers: int = 0
    """Text transformer blocks before fusion; 0 = embeddings go straight into fusion, as in the paper's T5."""
    width: int = 768
    """Fusion (and text) token width, T5-base's d_model."""
    fusion_layers: int = 12
    """Fusion transformer blocks (T5-base encoder: 12)."""
    fusion_heads: int = 12
    """Fusion attention heads (must divide width)."""
    mlp_ratio: float = 4.0
    """Hidden width of every transformer MLP, as a multiple of its token width."""
    decoder_channels: tuple[int, ...] = (384, 192, 96, 48)
    """Heatmap decoder: one 2x up-convolution per entry, with these channels; the map is then resized to image_size."""
    score_channels: int = 64
    """Score heads: channels of their first conv (the second has a quarter of them)."""
    score_hidden: int = 128
    """Score heads: hidden width of the MLP."""
    dropout: float = 0.0
    """Dropout in attention outputs and MLPs."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"RAHFConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        for width, heads, name in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.width, self.fusion_heads, "fusion")):
            if heads < 1 or width % heads:
                raise ValueError(f"RAHFConfig.{name}_heads ({heads}) must divide the {name} width ({width})")
        if self.score_channels < 4 or not self.decoder_channels:
            raise ValueError("RAHFConfig: score_channels must be >= 4 and decoder_channels non-empty")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Block(nn.Module):
    """Pre-norm transformer block (RMSNorm like T5); ``keep`` (B, T) bool masks padding keys."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, tokens, 3, self.heads, -1)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3x (B, h, T, d)
        mask = None if keep is None else keep[:, None, None, :]  # (B, 1, 1, T)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, h, T, d)
        attended = attended.transpose(1, 2).reshape(batch, tokens, width)  # (B, T, D)
        x = x + F.dropout(self.proj(attended), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class ChannelNorm(nn.Module):
    """T5-style LayerNorm over channels of a (B, C, h, w) map: no mean subtraction, no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-6) * self.weight


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), ChannelNorm(cout), nn.ReLU())


class HeatmapDecoder(nn.Module):
    """(B, D, g, g) -> (B, 1, g·2^n, g·2^n) in [0, 1]: conv, n x (2x up-conv, residual conv pair), conv, sigmoid."""

    def __init__(self, width: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = conv_block(width, channels[0])
        self.ups, self.refine = nn.ModuleList(), nn.ModuleList()
        for cin, cout in zip((channels[0],) + tuple(channels), channels):
            up = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)  # exactly 2x
            self.ups.append(nn.Sequential(up, ChannelNorm(cout), nn.ReLU()))
            self.refine.append(nn.Sequential(conv_block(cout, cout), nn.Conv2d(cout, cout, 3, padding=1),
                                             ChannelNorm(cout)))
        self.out = nn.Conv2d(channels[-1], 1, 3, padding=1)
        nn.init.constant_(self.out.bias, -4.0)  # heatmaps are mostly empty: start near sigmoid(-4) = 0.018

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for up, refine in zip(self.ups, self.refine):
            x = up(x)
            x = F.relu(x + refine(x))
        return torch.sigmoid(self.out(x))


class ScoreHead(nn.Module):
    """(B, D, g, g) -> (B,) in [0, 1]: two convs, flatten, MLP, sigmoid."""

    def __init__(self, width: int, grid: int, channels: int, hidden: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_block(width, channels), conv_block(channels, channels // 4))
        self.mlp = nn.Sequential(nn.Linear(channels // 4 * grid * grid, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(self.convs(x).flatten(1))).squeeze(1)


@dataclass
class RAHFOutput:
    heatmaps: dict[str, Tensor]
    """name -> (B, 1, image_size, image_size) in [0, 1]; high where wrong."""
    scores: dict[str, Tensor]
    """name -> (B,) in [0, 1]; higher is better."""


class RAHF(nn.Module):
    """The multi-head RAHF model (see the module docstring). ``forward`` takes images in [0, 1] of any size."""

    def __init__(self, config: RAHFConfig = RAHFConfig()) -> None:
        super().__init__()
        c, self.config = config, config
        self.patch = nn.Conv2d(3, c.vision_width, c.patch_size, stride=c.patch_size)
        self.vision_pos = nn.Parameter(torch.randn(1, c.grid**2, c.vision_width) * 0.02)
        self.vision = nn.ModuleList(Block(c.vision_width, c.vision_heads, c.mlp_ratio, c.dropout)
                                    for _ in range(c.vision_layers))
        self.vision_norm = nn.RMSNorm(c.vision_width)
        self.vision_proj = nn.Linear(c.vision_width, c.width)  # the reproduction's ViT -> T5 projection
        self.token_embedding = nn.Embedding(VOCAB_SIZE, c.width)
        self.text_pos = nn.Parameter(torch.randn(1, c.context_length, c.width) * 0.02)
        self.text = nn.ModuleList(Block(c.width, c.fusion_heads, c.mlp_ratio, c.dropout) for _ in range(c.text_layers))
        self.modality = nn.Parameter(torch.zeros(2, c.width))  # image / text type embeddings for fusion
        self.fusion = nn.ModuleList(Block(c.width, c.fusion_heads, c.mlp_ratio, c.dropout)
                                    for _ in range(c.fusion_layers))
        self.fusion_norm = nn.RMSNorm(c.width)
        self.heatmap_heads = nn.ModuleDict({name: HeatmapDecoder(c.width, c.decoder_channels) for name in HEATMAPS})
        self.score_heads = nn.ModuleDict({name: ScoreHead(c.width, c.grid, c.score_channels, c.score_hidden)
                                          for name in SCORES})
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)  # ViT: [0, 1] -> [-1, 1]
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)

    def features(self, images: Tensor, tokens: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1], tokens (B, L) -> fused image tokens as a map (B, D, g, g)."""
        c, size = self.config, (self.config.image_size,) * 2
        if images.shape[-2:] != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = self.patch((images - self.mean) / self.std).flatten(2).transpose(1, 2)  # (B, Dv, g, g) -> (B, g*g, Dv)
        x = x + self.vision_pos
        for block in self.vision:
            x = block(x)
        image = self.vision_proj(self.vision_norm(x)) + self.modality[0]  # (B, g*g, D)
        eot = (tokens == EOT).int().argmax(1, keepdim=True)  # (B, 1): the first end-of-text token
        keep = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot  # (B, L)
        text = self.token_embedding(tokens) + self.text_pos[:, : tokens.shape[1]]
        for block in self.text:
            text = block(text, keep)
        x = torch.cat([image, text + self.modality[1]], 1)  # (B, g*g + L, D)
        keep = torch.cat([keep.new_ones(keep.shape[0], image.shape[1]), keep], 1)
        for block in self.fusion:
            x = block(x, keep)
        image = self.fusion_norm(x[:, : c.grid**2])  # (B, g*g, D)
        return image.transpose(1, 2).reshape(image.shape[0], c.width, c.grid, c.grid)  # (B, D, g, g)

    def forward(self, images: Tensor, tokens: Tensor, heatmaps: tuple[str, ...] = HEATMAPS,
                scores: tuple[str, ...] = SCORES) -> RAHFOutput:
        """Only the named heads run (a reward needs one heatmap and one score)."""
        features = self.features(images, tokens)
        size = (self.config.image_size,) * 2
        maps = {}
        for name in heatmaps:
            heatmap = self.heatmap_heads[name](features)
            maps[name] = heatmap if heatmap.shape[-2:] == size else F.interpolate(heatmap, size=size, mode="bilinear",
                                                                                align_corners=False)
        return RAHFOutput(maps, {name: self.score_heads[name](features) for name in scores})


@lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer  # lazily: importing open_clip costs seconds

    return SimpleTokenizer(context_length=context_length)


def tokenize(prompts: list[str], context_length: int) -> Tensor:
    """Prompts -> (B, context_length) open_clip BPE ids: start token, text, end token (EOT), zero padding."""
    return _tokenizer(context_length)(list(prompts))


def read_safetensors(path: str | Path, what: str, source: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file; pickle formats are refused; errors name ``what`` and the file,
    and a missing one where such files come from (``source``)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{what} {path}: {path.suffix} is a pickle format; pass a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: {'a folder' if path.is_dir() else 'file not found'}; expected a "
                                f".safetensors file{source}; {WEIGHTS_HOWTO}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}
    except (SafetensorError, OSError) as error:
        reason = str(error).splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what} {path}: not a readable .safetensors file ({reason})") from None


def check_state(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Raise one line naming missing / unexpected keys or the first shape mismatch of ``state`` against ``model``."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        def head(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        raise ValueError(f"{where}: {len(missing)} missing keys [{head(missing)}], "
                         f"{len(unexpected)} unexpected keys [{head(unexpected)}] (wrong sizes or key names)")
    for key, value in expected.items():  # model order: the first mismatch is the earliest layer
        if state[key].shape != value.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(state[key].shape)}, the config expects "
                             f"{tuple(value.shape)}")


def load_rahf(path: str | Path, config: RAHFConfig | None = None, key_map: dict[str, str] | None = None) -> RAHF:
    """Build RAHF from a ``.safetensors`` state dict; the one place its weights are read.

    Args:
        path: a ``.safetensors`` file. Pickle files (.pt/.pth/.bin/.ckpt) are refused: convert them first.
        config: sizes; None = the JSON stored in the file's metadata under ``fnf.rahf.config`` (fnf.rahf.cli
            writes it). Given both, they must be equal (the error lists the fields that differ).
        key_map: prefix renames applied to the file's keys before loading, ``{"old.prefix.": "new.prefix."}``
            (first matching prefix wins), for state dicts written by other code when only the names differ.
            The public PyTorch reproduction (youweiliang/RichHF) has another architecture: load it with
            ``fnf.rewards.rahf_reproduction`` after ``fnf rahf-convert``.

    Raises:
        ValueError: pickle file, unreadable file, missing sizes, or keys/shapes that do not match (named).
    """
    state, metadata = read_safetensors(path, "RAHF weights", " (fnf rahf-train writes one)")
    stored = metadata.get(CONFIG_KEY)
    if stored is not None:
        try:
            stored = RAHFConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(stored).items()})
        except (ValueError, TypeError) as error:
            raise ValueError(f"RAHF weights {path}: bad {CONFIG_KEY} metadata ({error})") from None
    if config is None and stored is None:
        if "fnf.rahf_reproduction.config" in metadata:  # written by fnf rahf-convert: the other head reads it
            raise ValueError(f"RAHF weights {path}: written by fnf rahf-convert (the public reproduction's "
                             "checkpoint); use the RAHFReproductionHeatmap head for it")
        raise ValueError(f"RAHF weights {path}: no {CONFIG_KEY} metadata; pass config= (the model sizes)")
    if config is not None and stored is not None and config != stored:
        differences = ", ".join(f"{key} {value} (file: {getattr(stored, key)})" for key, value in asdict(config).items()
                                if value != asdict(stored)[key])
        raise ValueError(f"RAHF weights {path}: the given config differs from the sizes stored in the file: "
                         f"{differences}")
    if key_map:
        def rename(key: str) -> str:
            old = next((prefix for prefix in key_map if key.startswith(prefix)), None)
            return key if old is None else key_map[old] + key[len(old):]

        renamed = {rename(key): value for key, value in state.items()}
        if len(renamed) != len(state):
            raise ValueError(f"RAHF weights {path}: key_map renames two keys to the same name")
        state = renamed
    model = RAHF(config or stored)
    check_state(model, state, f"RAHF weights {path}")
    model.load_state_dict(state)
    return model


def save_rahf(model: RAHF, path: str | Path) -> None:
    """Write ``model`` as ``.safetensors`` with its sizes in the metadata; atomically (temp file, then os.replace)."""
    from safetensors.torch import save_file

    from fnf.files import atomic_path

    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    with atomic_path(path) as staging:
        save_file(state, str(staging), metadata={CONFIG_KEY: json.dumps(asdict(model.config))})


class RAHFHeatmap(RewardHead):
    """A trained RAHF as a reward: one of its scores (higher = better) and one of its heatmaps (high = wrong).

    ``heatmap: implausibility`` + ``score: plausibility`` is the artifact reward of Focus-N-Fix; ``misalignment`` +
    ``alignment`` the prompt-misalignment one. The heatmap is resized to the input images' resolution.
    """

    gives_heatmap = "yes"

    def __init__(self, weights: str, heatmap: Literal["implausibility", "misalignment"] = "implausibility",
                 score: Literal["plausibility", "alignment", "aesthetics", "overall"] = "plausibility",
                 config: RAHFConfig | None = None, key_map: dict[str, str] | None = None) -> None:
        """Load RAHF weights.

        Args:
            weights: ``.safetensors`` file written by ``fnf rahf-train fit`` (or converted; see key_map).
            heatmap: which predicted heatmap becomes the reward's heatmap.
            score: which predicted score becomes the reward.
            config: model sizes when the file has none in its metadata.
            key_map: prefix renames for state dicts written by other code (``fnf.rewards.rahf.load_rahf``).
        """
        super().__init__()
        if heatmap not in HEATMAPS:
            raise ValueError(f"{self.name}.heatmap: {heatmap!r} is not one of {HEATMAPS}")
        if score not in SCORES:
            raise ValueError(f"{self.name}.score: {score!r} is not one of {SCORES}")
        self.model, self.heatmap, self.score = load_rahf(weights, config, key_map), heatmap, score
        self.requires_grad_(False).eval()

    def forward(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        tokens = to_device(tokenize(prompts, self.model.config.context_length), images.device)
        output = self.model(images.float(), tokens, heatmaps=(self.heatmap,), scores=(self.score,))
        heatmap = output.heatmaps[self.heatmap]
        if heatmap.shape[-2:] != images.shape[-2:]:
            heatmap = F.interpolate(heatmap, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return RewardOutput(score=output.scores[self.score].float(),
                            heatmap=heatmap.clamp(0, 1).to(images.dtype))
