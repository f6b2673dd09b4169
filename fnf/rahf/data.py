"""RichHF-18K exported as jsonl -> batches for RAHF training.

The file format (one JSON object per line; blank lines are skipped; other keys are ignored)::

    {"image": "images/0001.jpg", "prompt": "a cat on a chair",
     "artifact_map": "maps/0001_artifact.png", "misalignment_map": "maps/0001_misalignment.npy",
     "artifact_score": 0.75, "misalignment_score": 1.0, "aesthetics_score": 0.5, "overall_score": 0.625}

- ``image``: any image Pillow reads, converted to RGB. Paths are relative to the jsonl file's folder (or absolute).
- ``prompt``: the generation prompt (non-empty string).
- ``artifact_map`` / ``misalignment_map``: the implausibility (artifact) and misalignment heatmaps, any size,
  0 = nothing marked. PNG (or any Pillow format): 8-bit -> /255, 16-bit -> /65535, mode F as is. NPY: a 2-D
  array (or (1, H, W) / (H, W, 1)); uint8 -> /255, uint16 -> /65535, floats as is. Values must end up in [0, 1].
- ``artifact_score`` (-> plausibility), ``misalignment_score`` (-> text-image alignment), ``aesthetics_score``,
  ``overall_score``: ratings where higher is better. These are the RichHF-18K TFRecord feature names, mapped to
  RAHF's outputs as the public PyTorch reproduction does. ``score_scale: unit`` takes them in [0, 1] as they are;
  ``likert`` takes the 1-5 Likert scale and maps s -> (s - 1) / 4. Out-of-range values are errors.

Images and heatmaps are resized (bilinear, antialiased) to ``image_size``. RichHF-18K ships TFRecords without
images (they are in Pick-a-Pic v1); exporting to this format is left to the user, TFRecord reading is not built in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fnf.jsonl import json_objects
from fnf.rewards.rahf import HEATMAPS, SCORES

MAP_KEYS = {"implausibility": "artifact_map", "misalignment": "misalignment_map"}
SCORE_KEYS = {"plausibility": "artifact_score", "alignment": "misalignment_score", "aesthetics": "aesthetics_score",
              "overall": "overall_score"}
ScoreScale = Literal["unit", "likert"]


class RichHFFileError(ValueError):
    """A RichHF jsonl file is unusable; the message names the file and line."""


class Record(NamedTuple):
    image: Path
    prompt: str
    maps: dict[str, Path]  # heatmap name -> file
    scores: dict[str, float]  # score name -> value in [0, 1]
    where: str  # "file.jsonl:12", for errors


def _path(base: Path, value: Any, key: str, where: str) -> Path:
    """The file ``value`` names, opened far enough to know it is an image (Pillow) or an array (.npy): a file that is
    not one stops the run when the file list is read, not hours into training (a corrupt body still shows only
    when the item is loaded; its error names the line too)."""
    if not isinstance(value, str) or not value:
        raise RichHFFileError(f"{where}: '{key}' must be a file path, got {value!r}")
    path = base / value
    if not path.is_file():
        raise RichHFFileError(f"{where}: {key} file {path} not found")
    try:
        if path.suffix.lower() == ".npy":
            np.load(path, mmap_mode="r", allow_pickle=False)  # the header only
        else:
            Image.open(path).close()  # the header only
    except (OSError, ValueError) as error:
        kind = "a .npy array" if path.suffix.lower() == ".npy" else "an image Pillow reads"
        reason = str(error).splitlines()[0][:200]
        raise RichHFFileError(f"{where}: {key} file {path} is not {kind} ({reason})") from None
    return path


def _score(value: Any, key: str, scale: ScoreScale, where: str) -> float:
    low, high = (0.0, 1.0) if scale == "unit" else (1.0, 5.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RichHFFileError(f"{where}: '{key}' must be a number in [{low:g}, {high:g}] (score_scale: {scale}), "
                              f"got {value!r}")
    return float(value) if scale == "unit" else (float(value) - 1) / 4


def read_richhf_jsonl(path: str | Path, score_scale: ScoreScale = "unit") -> list[Record]:
    """Parse and check a jsonl file (format in the module docstring); every error names ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: RichHF jsonl file not found")
    if score_scale not in ("unit", "likert"):
        raise ValueError(f"score_scale: {score_scale!r} is not 'unit' or 'likert'")
    records = []
    for where, row in json_objects(path.read_text(encoding="utf-8"), path, RichHFFileError):
        missing = [key for key in ("image", "prompt", *MAP_KEYS.values(), *SCORE_KEYS.values()) if key not in row]
        if missing:
            raise RichHFFileError(f"{where}: missing keys {missing}")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise RichHFFileError(f"{where}: 'prompt' must be a non-empty string, got {row['prompt']!r}")
        records.append(Record(
            image=_path(path.parent, row["image"], "image", where), prompt=row["prompt"].strip(),
            maps={name: _path(path.parent, row[key], key, where) for name, key in MAP_KEYS.items()},
            scores={name: _score(row[key], key, score_scale, where) for name, key in SCORE_KEYS.items()}, where=where))
    if not records:
        raise RichHFFileError(f"{path}: no records")
    return records


def read_heatmap(path: Path) -> Tensor:
    """A heatmap file -> (H, W) float32 in [0, 1] (scaling rules in the module docstring)."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
        if array.ndim != 2:
            raise ValueError(f"heatmap {path}: expected a 2-D array, got shape {array.shape}")
    else:
        with Image.open(path) as image:
            image = image if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") else image.convert("L")
            array = np.array(image)
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype)
    if scale is None and np.issubdtype(array.dtype, np.integer):  # Pillow's 32-bit mode I holds 16-bit PNGs
        scale = 65535.0
    heatmap = torch.from_numpy(array.astype(np.float32) / (scale or 1.0))
    if not bool(((heatmap >= 0) & (heatmap <= 1)).all()):
        raise ValueError(f"heatmap {path}: values must be in [0, 1] after scaling, got [{heatmap.min():.3g}, "
                         f"{heatmap.max():.3g}]")
    return heatmap


def _resize(x: Tensor, size: int) -> Tensor:  # (C, H, W) -> (C, size, size)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


class RichHFDataset(Dataset):
    """Items ``{"image": (3, S, S) in [0, 1], "prompt": str, "heatmaps": {name: (1, S, S)}, "scores": {name: ()}}``."""

    def __init__(self, records: list[Record], image_size: int) -> None:
        self.records, self.image_size = records, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            with Image.open(record.image) as image:
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255  # (3, H, W)
            maps = {name: _resize(read_heatmap(path)[None], self.image_size).clamp(0, 1)
                    for name, path in record.maps.items()}
        except (OSError, ValueError) as error:
            raise RichHFFileError(f"{record.where}: {str(error).splitlines()[0][:300]}") from None
        scores = {name: torch.tensor(value) for name, value in record.scores.items()}
        return {"image": _resize(pixels, self.image_size).clamp(0, 1), "prompt": record.prompt, "heatmaps": maps,
                "scores": scores}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"images": torch.stack([item["image"] for item in items]), "prompts": [item["prompt"] for item in items],
            "heatmaps": {name: torch.stack([item["heatmaps"][name] for item in items]) for name in HEATMAPS},
            "scores": {name: torch.stack([item["scores"][name] for item in items]) for name in SCORES}}


class RichHFDataModule(L.LightningDataModule):
    """RichHF-18K-format jsonl files (format: ``fnf.rahf.data`` docstring) for fit / validate / test."""

    def __init__(self, train_file: str | None = None, val_file: str | None = None, test_file: str | None = None,
                 score_scale: ScoreScale = "unit", image_size: int = 224, batch_size: int = 8,
                 num_workers: int = 0) -> None:
        """Read RichHF-18K-format jsonl files.

        Args:
            train_file: jsonl of training images (RichHF-18K: train split).
            val_file: jsonl evaluated after each epoch (RichHF-18K: dev split); None = no validation.
            test_file: jsonl for ``test`` (RichHF-18K: test split).
            score_scale: unit = scores given in [0, 1]; likert = the 1-5 scale, mapped to (s - 1) / 4.
            image_size: side images and heatmaps are resized to (linked to model.config.image_size by the CLI).
            batch_size: images per batch (per process).
            num_workers: DataLoader worker processes (0 = load in the main process).
        """
        super().__init__()
        if score_scale not in ("unit", "likert"):
            raise ValueError(f"data.score_scale: {score_scale!r} is not 'unit' or 'likert'")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.score_scale, self.image_size = score_scale, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.datasets: dict[str, RichHFDataset] = {}

    def setup(self, stage: str) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for split in wanted:
            path = self.files[split]
            if path is None and split != "val":
                raise ValueError(f"data.{split}_file: required for {stage}")
            if path is not None and split not in self.datasets:
                self.datasets[split] = RichHFDataset(read_richhf_jsonl(path, self.score_scale), self.image_size)
        if stage == "validate" and "val" not in self.datasets:
            raise ValueError("data.val_file: required for validate")

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
