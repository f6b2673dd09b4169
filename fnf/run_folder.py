"""What ``fnf fit`` and ``fnf test`` left in a run folder, for ``fnf report``: the one ``test_metrics.json``, the
Evaluation callback's ``test_items.jsonl`` and ``test_samples/``, and the training curves from whatever loggers
wrote there (TensorBoard, CSV, MLflow file store, W&B run files). Unreadable files are one error naming the file."""

from __future__ import annotations

import base64
import csv
import itertools
import json
import os
from pathlib import Path

from fnf.jsonl import json_objects


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _metrics_file(run: Path) -> Path:
    """The run's one ``test_metrics.json``: several (a folder of several runs) would mix runs, so name them."""
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: {'a file' if run.exists() else 'no such folder'}; expected a run folder "
                                "(the default_root_dir of fnf fit / fnf test)")
    found = sorted(run.rglob("test_metrics.json"))
    if not found:
        beside = (sorted(run.parent.glob("*/test_metrics.json"), key=lambda path: path.stat().st_mtime)
                  if run.parent.name == "lightning_logs" else [])  # the newest test last
        hint = (f" (fnf test writes a version folder of its own: {beside[-1].parent} has one; or name the runs' "
                f"default_root_dir, {run.parent.parent})" if beside else "")
        raise FileNotFoundError(f"{run}: no test_metrics.json; run `fnf test` with the Evaluation callback first{hint}")
    if len(found) > 1:
        folders = ", ".join(str(f.parent.relative_to(run)) for f in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"{run}: holds {len(found)} test results ({folders}); one run per folder: name the folder "
                         "of one, or move the others out")
    return found[0]


def _metrics(path: Path) -> dict[str, float]:
    metrics = _read_json(path)
    entries = metrics.items() if isinstance(metrics, dict) else [("the file", metrics)]
    for key, value in entries:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected an object of metric names and numbers, as fnf test writes it; "
                             f"{key} is {value!r}")
    return {key: float(value) for key, value in metrics.items()}


def _samples(path: Path) -> list[dict]:
    """``test_samples/samples.json``: each sample's image (embedded), prompt, seed and numbers."""
    if not path.is_file():
        return []
    samples = _read_json(path)
    for n, sample in enumerate(samples if isinstance(samples, list) else [None]):
        missing = ["image", "prompt", "seed"] if not isinstance(sample, dict) else [
            key for key in ("image", "prompt", "seed") if key not in sample]
        if missing:
            raise ValueError(f"{path}: sample {n} lacks {', '.join(missing)}; expected a list of samples as the "
                             "Evaluation callback writes them")
        try:
            sample["png"] = base64.b64encode((path.parent / sample["image"]).read_bytes()).decode()
        except OSError as error:
            raise FileNotFoundError(f"{path}: sample {n}'s image {sample['image']}: {error.strerror}") from None
    return samples


def _items(path: Path) -> list[dict] | None:
    """``test_items.jsonl`` (fnf.item_metrics): one object per tested item; None where the run has none."""
    if not path.is_file():
        return None
    rows = []
    for where, row in json_objects(path.read_text(encoding="utf-8"), path, example='{"prompt": "...", "seed": 0}'):
        if "prompt" not in row or "seed" not in row:
            raise ValueError(f"{where}: expected an object with prompt, seed and metric parts, as fnf test writes it")
        rows.append(row)
    return rows


def load_run(run: Path) -> dict:
    """Metrics, per-item parts, samples and training curves of one run folder (any may be missing, except
    metrics)."""
    metrics_file = _metrics_file(run)
    fits = sorted(str(folder.parent.relative_to(run)) for folder in run.rglob("checkpoints") if folder.is_dir())
    mixed = (f"the folder holds {len(fits)} fits ({', '.join(fits)}), whose logs would be drawn as one curve: give "
             "each run its own root") if len(fits) > 1 else None
    return {"name": Path(os.path.abspath(run)).name, "folder": str(run), "metrics": _metrics(metrics_file),
            "items": _items(metrics_file.parent / "test_items.jsonl"),
            "samples": _samples(metrics_file.parent / "test_samples" / "samples.json"),
            "curves": {} if mixed else training_curves(run), "curves_left_out": mixed}


def _curve_tag(tag: str) -> bool:
    return tag.startswith("train/reward/") or tag == "train/fidelity"


def training_curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """``train/reward/*`` and ``train/fidelity`` per optimizer step, from whatever the run's loggers left in its
    folder: TensorBoard event files, CSVLogger's ``metrics.csv``, an MLflow file store, W&B run files (online or
    offline). A step logged by two loggers counts once."""
    curves: dict[str, dict[int, float]] = {}
    readers = (_tensorboard_scalars, _csv_scalars, _mlflow_scalars, _wandb_scalars)
    for tag, step, value in itertools.chain.from_iterable(read(run) for read in readers):
        if _curve_tag(tag):
            curves.setdefault(tag, {})[step] = value
    return {tag: sorted(points.items()) for tag, points in sorted(curves.items())}


def _tensorboard_scalars(run: Path) -> list[tuple[str, int, float]]:
    """TensorBoard event files, record by record. A record cut off at the end (a crash mid-write) ends the file;
    a checksum mismatch is an error naming the file (TensorBoard's own loader stops there without a word)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub.errors import DataLossError, OutOfRangeError
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
    from tensorboard.util.tensor_util import make_ndarray

    scalars = []
    for events in sorted(run.rglob("events.out.tfevents.*")):
        reader = PyRecordReader_New(str(events))
        with reader.file_handle:
            for number in itertools.count(1):
                try:
                    reader.GetNext()
                except OutOfRangeError:
                    break
                except DataLossError as error:
                    if "truncated record" in error.message:
                        break
                    raise ValueError(f"{events}: corrupt record {number} (checksum mismatch)") from None
                event = Event.FromString(reader.record())
                for value in filter(lambda v: _curve_tag(v.tag), event.summary.value):
                    scalar = value.simple_value if value.HasField("simple_value") else make_ndarray(value.tensor)
                    scalars.append((value.tag, event.step, float(scalar)))
    return scalars


def _csv_scalars(run: Path) -> list[tuple[str, int, float]]:
    """Lightning's CSVLogger: one ``metrics.csv`` per version, a ``step`` column and one column per metric."""
    scalars = []
    for table in sorted(run.rglob("metrics.csv")):
        with table.open(newline="", encoding="utf-8") as file:
            rows = csv.DictReader(file)
            try:
                for row in rows:
                    scalars += [(tag, int(row["step"]), float(value)) for tag, value in row.items()
                                if _curve_tag(tag) and value not in ("", None) and row.get("step")]
            except (ValueError, UnicodeDecodeError) as error:
                raise ValueError(f"{table}:{rows.line_num}: not a CSVLogger metrics row ({error})") from None
    return scalars


def _mlflow_scalars(run: Path) -> list[tuple[str, int, float]]:
    """An MLflow file store: ``<experiment>/<run id>/metrics/<metric/path>``, lines ``timestamp value step``."""
    scalars = []
    for metrics in sorted(run.rglob("metrics")):
        if metrics.is_dir() and (metrics.parent / "meta.yaml").is_file():
            for history in sorted(p for p in metrics.rglob("*") if p.is_file()):
                tag = history.relative_to(metrics).as_posix()
                if not _curve_tag(tag):
                    continue
                for number, line in enumerate(history.read_text(encoding="utf-8").splitlines(), start=1):
                    try:
                        _, value, step = line.split()[:3]
                        scalars.append((tag, int(step), float(value)))
                    except ValueError:
                        raise ValueError(f"{history}:{number}: expected 'timestamp value step' (an MLflow metric "
                                         f"file), got {line[:60]!r}") from None
    return scalars


def _wandb_scalars(run: Path) -> list[tuple[str, int, float]]:
    """Lightning's WandbLogger: rows of ``wandb/*/run-<id>.wandb`` with the optimizer step in
    ``trainer/global_step`` (W&B's own ``_step`` counts log calls, not steps)."""
    from fnf.wandb_history import history

    scalars = []
    for run_file in sorted(run.rglob("run-*.wandb")):
        for row in history(run_file):
            if "trainer/global_step" in row:
                step = int(row["trainer/global_step"])
                scalars += [(tag, step, value) for tag, value in row.items() if _curve_tag(tag)]
    return scalars
