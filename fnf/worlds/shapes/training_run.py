"""What the shapes-world model trainers (``train_t2i``, ``train_flow``) share: their dataclass of hyperparameters
as command-line flags, and a run's set-up (2 threads, deterministic kernels, the seed, a wall-clock deadline, a
checkpoint folder with an appended ``train.log``), so that a retrained model is the same model."""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import TypeVar

import torch

Args = TypeVar("Args")


def args_parser(description: str, defaults) -> argparse.ArgumentParser:
    """``--out``, ``--work-dir`` and one ``--kebab-name`` flag per field of the ``defaults`` dataclass."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path)
    for name, value in asdict(defaults).items():
        kind = float if name == "minutes" else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    parser.add_argument("--work-dir", type=Path, default=None, help="checkpoint folder (default: a temp dir)")
    return parser


def parsed_args(namespace: argparse.Namespace, cls: type[Args]) -> Args:
    return cls(**{field.name: getattr(namespace, field.name) for field in fields(cls)})


class TrainingRun:
    """The clock, the deadline (``minutes``: 0 means none), the work folder and the log of one training run."""

    def __init__(self, seed: int, minutes: float, work_dir: Path | None, prefix: str) -> None:
        torch.set_num_threads(2)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(seed)
        self.start = time.time()
        self.deadline = self.start + 60 * minutes if minutes else math.inf
        self.work = work_dir or Path(tempfile.mkdtemp(prefix=prefix))
        self.work.mkdir(parents=True, exist_ok=True)
        self._log_file = (self.work / "train.log").open("a")

    def seconds(self) -> int:
        return round(time.time() - self.start)

    def log(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.0f}s] {message}"
        print(line, flush=True)
        self._log_file.write(line + "\n")
        self._log_file.flush()
