"""Lightning's CSVLogger in run folders fnf claims and continues.

Its writer deletes the ``metrics.csv`` it finds in a log folder that "exists and is not empty": on ``--ckpt_path
last`` that file is the run's own history up to the checkpoint, and on a new run the folder holds only what fnf
wrote there first (its lock and config), so the warning it prints then is noise.
"""

from __future__ import annotations

import csv
import io

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from fnf.files import write_text_atomically


def before_checkpoint(row: dict, step: int) -> bool:
    """A metrics row logged before the checkpoint of ``step`` optimizer steps: a training step logs at its index
    (steps 0 .. step − 1 are in the checkpoint; the row at ``step`` is the next one, trained again after a resume),
    a validation after step ``step`` at ``step`` (not run again after the resume)."""
    if not row.get("step"):
        return True
    logged = float(row["step"])
    return logged < step or (logged == step and not any(v for k, v in row.items() if k.startswith("train")))


class ContinuedMetrics(ExperimentWriter):
    """A CSV writer that keeps the run's rows logged before ``resumed_step`` (``before_checkpoint``; the later ones
    are trained and logged again) and appends under the same columns; a new run's folder has no metrics.csv yet."""

    def __init__(self, log_dir: str, resumed_step: int | None) -> None:
        self.resumed_step = resumed_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's: warn, then delete metrics.csv
        if self.resumed_step is None or not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if before_checkpoint(row, self.resumed_step)]
            columns = list(reader.fieldnames or [])
        kept = io.StringIO()
        writer = csv.DictWriter(kept, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomically(self.metrics_file_path, kept.getvalue())
        self.metrics_keys = sorted(columns)  # new columns later rewrite the file with the old ones kept


def keep_csv_metrics(loggers: list, resumed_step: int | None) -> None:
    """Give every CSVLogger of rank 0 (``loggers``: the trainer's on rank 0) a ``ContinuedMetrics`` writer before its
    first write; ``resumed_step``: the checkpoint's step when the run continues its folder, else None."""
    for logger in loggers:
        if isinstance(logger, CSVLogger) and logger._experiment is None:
            logger._experiment = ContinuedMetrics(logger.log_dir, resumed_step)
