"""Images and tables to every logger of the run (``trainer.loggers``), each in the way it can show them.

* TensorBoard: ``add_image``; tables as markdown text (``add_text``).
* Weights & Biases: ``WandbLogger.log_image`` / ``log_table``.
* MLflow: run artifacts, ``MlflowClient.log_image(key, step)`` and tables as ``tables/<tag>/<step>.csv``
  (``log_table`` would need pandas).
* Any other logger (CSV, custom): files beside its metrics, ``<log dir>/images/<tag>/<step>.png`` and
  ``<log dir>/tables/<tag>/<step>.csv``, so a logger this file does not know still gets everything.

Only global rank 0 logs (the loggers' own rule; the file fallback would otherwise write once per rank).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from lightning import Trainer
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor

from fnf.files import atomic_path, write_text_atomically


def log_image(trainer: Trainer, tag: str, image: Tensor, step: int) -> None:
    """Log one (3, H, W) image with values in [0, 1] under ``tag`` at ``step`` to every logger."""
    if not trainer.is_global_zero:
        return
    image = image.detach().float().cpu().clamp(0, 1)
    picture = Image.fromarray((image * 255 + 0.5).byte().permute(1, 2, 0).numpy())  # rounded as save_image does
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [picture], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, picture, key=file_name(tag), step=step)
        else:
            with atomic_path(_log_dir(logger, trainer) / "images" / file_name(tag) / f"{step}.png") as staging:
                picture.save(staging, format="PNG")


def log_table(trainer: Trainer, tag: str, columns: list[str], rows: list[list], step: int) -> None:
    """Log a table (``rows`` of values under ``columns``) under ``tag`` at ``step`` to every logger."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            lines = [columns, ["---"] * len(columns), *rows]
            logger.experiment.add_text(tag, "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines), step)
        elif isinstance(logger, WandbLogger):
            logger.log_table(tag, columns=columns, data=rows, step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, _csv(columns, rows), f"tables/{file_name(tag)}/{step}.csv")
        else:
            path = _log_dir(logger, trainer) / "tables" / file_name(tag) / f"{step}.csv"
            write_text_atomically(path, _csv(columns, rows))


def file_name(tag: str) -> str:
    """The tag as a relative path MLflow keys and file systems accept: 'train/base|tuned' -> 'train/base_tuned'."""
    return re.sub(r"[^\w./-]+", "_", tag).replace("..", "_")


def _csv(columns: list[str], rows: list[list]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([columns, *rows])
    return text.getvalue()


def _log_dir(logger: Logger, trainer: Trainer) -> Path:
    return Path(logger.log_dir or logger.save_dir or trainer.default_root_dir)
