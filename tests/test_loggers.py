"""Image grids, test samples and metric tables reach whichever Lightning loggers a run configures (one
``--trainer.logger`` away): TensorBoard, W&B (offline), MLflow (file store), CSV and any other logger (PNG and
CSV files beside its metrics). Real runs of the shipped shapes model at 16 px (a 2-step fit, a 1-batch test),
offline; W&B and MLflow (the ``loggers`` extra) are checked where installed."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image

from fnf.cli import main
from fnf.image_logging import log_image, log_table

REPO = Path(__file__).parents[1]
SIDE = 16  # --model.sampler.resolution: each image of the grid is SIDE × SIDE
GRID = (4 * (SIDE + 2) + 2, 2 * (SIDE + 2) + 2)  # (width, height): base|tuned|mask|diff × 2 images, padding 2
TINY = ["--config", "configs/artifacts.yaml", "--model.sampler.num_steps", "2", "--model.sampler.resolution",
        str(SIDE), "--data.batch_size", "2", "--trainer.enable_progress_bar", "false"]


def _fit(tmp_path: Path, *loggers: dict) -> None:
    """2 optimizer steps, a grid at each: steps 1 and 2."""
    main(["fit", *TINY, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
          "--trainer.enable_checkpointing", "false", "--image_logger.every_n_steps", "1",
          "--image_logger.max_images", "2", "--trainer.log_every_n_steps", "1",
          "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", json.dumps(list(loggers))])


def _sizes(files) -> list[tuple[int, int]]:
    return [Image.open(f).size for f in sorted(files)]


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The configs' relative prompt paths; W&B offline; MLflow's file store (opt-in since MLflow 3.x)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    _offline(monkeypatch)


def csv_logger(folder: Path) -> dict:
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder)}}


def tensorboard_logger(folder: Path) -> dict:
    return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(folder)}}


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory) -> Path:
    """One 2-step fit with several loggers at once: TensorBoard, CSV, and W&B (offline) and MLflow (file store)
    where installed; the tests below each check that their logger got both grids."""
    folder = tmp_path_factory.mktemp("fit")
    loggers = [tensorboard_logger(folder / "tb"), csv_logger(folder / "csv")]
    if importlib.util.find_spec("wandb"):
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"offline": True, "save_dir": str(folder / "wandb_dir")}})
    if importlib.util.find_spec("mlflow"):
        loggers.append({"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                        "init_args": {"tracking_uri": f"file:{folder / 'mlruns'}"}})
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch)
        try:
            _fit(folder, *loggers)
        finally:
            if sys.modules.get("wandb") is not None:
                sys.modules["wandb"].finish()  # a later W&B logger starts its own run
    return folder


def test_csv_logger_gets_png_grids_beside_its_metrics(fit_run):
    """CSV, like any logger fnf does not special-case: PNG files by tag and step."""
    images = fit_run / "csv" / "lightning_logs" / "version_0" / "images"
    grids = sorted(images.rglob("*.png"))
    assert [g.relative_to(images).as_posix() for g in grids] == [
        "train/base_tuned_mask_diff/1.png", "train/base_tuned_mask_diff/2.png"]
    assert _sizes(grids) == [GRID, GRID]


def test_tensorboard_gets_the_grids(fit_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(fit_run / "tb" / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    images = events.Reload().Images("train/base|tuned|mask|diff")
    assert [(i.step, i.width, i.height) for i in images] == [(1, *GRID), (2, *GRID)]


def test_wandb_offline_run_gets_the_grids_as_media(fit_run):
    pytest.importorskip("wandb")
    run, = (fit_run / "wandb_dir" / "wandb").glob("offline-run-*")
    grids = list((run / "files" / "media" / "images" / "train").glob("base|tuned|mask|diff_*.png"))
    assert _sizes(grids) == [GRID, GRID]


def test_mlflow_file_store_run_gets_the_grids_as_artifacts(fit_run):
    pytest.importorskip("mlflow")
    grids = list((fit_run / "mlruns").glob("*/*/artifacts/images/*base_tuned_mask_diff*.png"))
    assert _sizes(grids) == [GRID, GRID]


def test_report_reads_the_same_training_curves_from_tensorboard_csv_mlflow_and_wandb(fit_run):
    """fnf report's curves do not depend on which of these loggers wrote them."""
    from fnf.run_folder import training_curves

    tensorboard = training_curves(fit_run / "tb")
    assert set(tensorboard) == {"train/reward/ShapesArtifact", "train/fidelity"}
    assert [step for step, _ in tensorboard["train/fidelity"]] == [0, 1]  # 2 optimizer steps, each logged
    stores = ["csv", *(["mlruns"] if importlib.util.find_spec("mlflow") else []),
              *(["wandb_dir"] if importlib.util.find_spec("wandb") else [])]
    for store in stores:
        curves = training_curves(fit_run / store)
        assert curves.keys() == tensorboard.keys(), store
        for tag, points in curves.items():
            assert [s for s, _ in points] == [s for s, _ in tensorboard[tag]], (store, tag)
            assert [v for _, v in points] == pytest.approx([v for _, v in tensorboard[tag]], rel=1e-6), (store, tag)


def test_fnf_test_logs_the_metric_table_and_sample_rows_to_every_logger(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["test", *TINY, "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger", json.dumps([csv_logger(tmp_path / "csv"), tensorboard_logger(tmp_path)])])
    version = tmp_path / "csv" / "lightning_logs" / "version_0"  # the first logger's: the Evaluation files go here
    metrics = json.loads((version / "test_metrics.json").read_text())
    with open(version / "tables" / "test_metrics" / "0.csv") as table:
        rows = list(csv.reader(table))
    assert rows[0] == ["metric", "value"] and {k: float(v) for k, v in rows[1:]} == pytest.approx(metrics, nan_ok=True)
    samples = sorted((version / "images" / "test_samples").rglob("*.png"))  # one row per kept sample (batch of 2)
    assert [s.relative_to(version / "images").as_posix() for s in samples] == ["test_samples/000/0.png",
                                                                                "test_samples/001/0.png"]
    rows = sorted((version / "test_samples").glob("*.png"))  # the rows fnf report reads
    assert [Image.open(s).tobytes() for s in samples] == [Image.open(r).tobytes() for r in rows]
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"images": 0}).Reload()
    assert {"test_samples/000", "test_samples/001"} <= set(events.Tags()["images"])
    text = events.Tensors("test_metrics/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| metric | value |") and "| reward_change/ShapesArtifact |" in text


def test_tables_reach_wandb_and_mlflow(tmp_path):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    mlflow = MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    w_and_b = WandbLogger(offline=True, save_dir=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=True, loggers=[w_and_b, mlflow], default_root_dir=str(tmp_path))
    try:
        log_table(trainer, "test_metrics", ["metric", "value"], [["fid", 1.5], ["psnr", 30.0]], step=3)
        run_dir = Path(w_and_b.experiment.dir)
    finally:
        wandb.finish()
    table, = (run_dir / "media" / "table").glob("test_metrics_*.table.json")
    assert json.loads(table.read_text())["data"] == [["fid", 1.5], ["psnr", 30.0]]
    text = (Path(mlflow.experiment.get_run(mlflow.run_id).info.artifact_uri.removeprefix("file:"))
            / "tables" / "test_metrics" / "3.csv").read_text()
    assert text == "metric,value\nfid,1.5\npsnr,30.0\n"


class _PlainLogger(Logger):
    """A logger fnf knows nothing about: no log_dir, only a save_dir."""

    name, version, save_dir = "plain", 0, None

    def log_metrics(self, metrics, step=None) -> None: ...

    def log_hyperparams(self, params, *args, **kwargs) -> None: ...


def test_an_unknown_logger_gets_files_and_only_rank_zero_writes(tmp_path):
    plain = _PlainLogger()
    plain.save_dir = str(tmp_path / "plain")
    image = torch.rand(3, 5, 7)
    for rank in (1, 0):  # rank 1 first: it must write nothing
        trainer = SimpleNamespace(is_global_zero=rank == 0, loggers=[plain, CSVLogger(tmp_path / "csv")],
                                  default_root_dir=str(tmp_path))
        log_image(trainer, "a/b|c", image, step=4)
        log_table(trainer, "t", ["x"], [[1]], step=4)
        if rank == 1:
            assert not any(tmp_path.rglob("*.*"))
    written = Image.open(tmp_path / "plain" / "images" / "a" / "b_c" / "4.png")
    assert torch.equal(torch.from_numpy(np.asarray(written)).permute(2, 0, 1), (image * 255 + 0.5).to(torch.uint8))
    assert (tmp_path / "plain" / "tables" / "t" / "4.csv").read_text() == "x\n1\n"
    assert (tmp_path / "csv" / "lightning_logs" / "version_0" / "images" / "a" / "b_c" / "4.png").is_file()


def test_report_stops_at_a_torn_tensorboard_record_and_names_a_corrupt_one(fit_run, tmp_path):
    """A crash mid-write tears the last record: the curves before it are read. A flipped byte inside the file is
    named (TensorBoard's own loader would stop there silently and the report would show a short curve)."""
    from tensorboard.compat.proto.event_pb2 import Event

    from fnf.run_folder import training_curves

    events, = (fit_run / "tb").rglob("events.out.tfevents.*")
    data = events.read_bytes()
    records, start = [], 0  # TFRecord framing: length (8 bytes), its CRC (4), the event, its CRC (4)
    while start < len(data):
        length = int.from_bytes(data[start:start + 8], "little")
        records.append((start, Event.FromString(data[start + 12:start + 12 + length])))
        start += 16 + length
    number, last_start = max((n, start) for n, (start, event) in enumerate(records, start=1)
                             if any(v.tag == "train/fidelity" for v in event.summary.value))
    torn = tmp_path / "torn" / events.name
    torn.parent.mkdir()
    torn.write_bytes(data[:last_start + 20])  # the last fidelity value's record, cut inside its event
    whole, curves = training_curves(fit_run / "tb"), training_curves(torn.parent)
    assert curves["train/fidelity"] == whole["train/fidelity"][:-1]
    assert all(curves[tag] == points[:len(curves[tag])] for tag, points in whole.items())
    corrupt = tmp_path / "corrupt" / events.name
    corrupt.parent.mkdir()
    corrupt.write_bytes(data[:last_start + 20] + bytes([data[last_start + 20] ^ 1]) + data[last_start + 21:])
    with pytest.raises(ValueError, match=rf"{events.name}: corrupt record {number} \(checksum mismatch\)"):
        training_curves(corrupt.parent)


def test_a_run_logged_to_mlflow_first_keeps_its_checkpoints_and_export_in_a_folder_of_its_own(tmp_path, caplog):
    """MLflow (or W&B) first: Lightning would put every run's checkpoints and LoRA export into the logger's save dir,
    outside default_root_dir (--ckpt_path last finds nothing there; a second run replaces the first's export). fnf
    gives each run <default_root_dir>/lightning_logs/version_N, and a resume continues it."""
    pytest.importorskip("mlflow")
    logger = json.dumps([{"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                          "init_args": {"tracking_uri": f"file:{tmp_path / 'mlruns'}"}}])
    fit = ["fit", *TINY, "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.logger", logger]
    with caplog.at_level("INFO"):
        main([*fit, "--trainer.max_steps", "1"])
    runs = tmp_path / "run" / "lightning_logs"
    assert f"fnf: run folder {runs / 'version_0'}; LoRA" in caplog.text  # not MLflow's save dir
    main([*fit, "--trainer.max_steps", "1"])  # a second run: a folder of its own
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    assert all((runs / v / "lora" / "pytorch_lora_weights.safetensors").is_file() for v in ("version_0", "version_1"))
    assert all((runs / v / "config.yaml").is_file() for v in ("version_0", "version_1"))  # each run's own config
    assert not list((tmp_path / "mlruns").rglob("*.ckpt")) and not (tmp_path / "mlruns" / "lora").exists()
    assert not list((tmp_path / "mlruns").rglob("config.yaml"))
    (runs / "version_1" / "checkpoints" / "last.ckpt").unlink()  # version_0 is now the one to continue
    main([*fit, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]


def test_mlflow_first_keeps_folders_the_config_chose_and_shares_a_tensorboard_version(tmp_path):
    """With MLflow first: checkpoint.dirpath and lora_export.dirpath given by the user are where files go; a
    TensorBoard logger in default_root_dir lends its version folder (one folder for events and checkpoints)."""
    pytest.importorskip("mlflow")
    mlflow = {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
              "init_args": {"tracking_uri": f"file:{tmp_path / 'mlruns'}"}}
    fit = ["fit", *TINY, "--trainer.limit_val_batches", "0", "--trainer.max_steps", "1"]
    main([*fit, "--trainer.default_root_dir", str(tmp_path / "own"), "--trainer.logger", json.dumps([mlflow]),
          "--checkpoint.dirpath", str(tmp_path / "ckpts"), "--lora_export.dirpath", str(tmp_path / "my_lora")])
    assert (tmp_path / "ckpts" / "last.ckpt").is_file()
    assert (tmp_path / "my_lora" / "pytorch_lora_weights.safetensors").is_file()
    main([*fit, "--trainer.default_root_dir", str(tmp_path / "run"),
          "--trainer.logger", json.dumps([mlflow, tensorboard_logger(tmp_path / "run")])])
    runs = tmp_path / "run" / "lightning_logs"
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    assert (runs / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert any((runs / "version_0").glob("events.out.tfevents.*"))


def test_fnf_test_logged_to_mlflow_first_writes_its_files_into_a_folder_of_its_own(tmp_path):
    """Two ``fnf test`` runs with MLflow first: each run's test_metrics.json and test_samples/ in its own
    <default_root_dir>/lightning_logs/version_N (the MLflow save dir is shared: the second would replace the first)."""
    pytest.importorskip("mlflow")
    logger = json.dumps([{"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                          "init_args": {"tracking_uri": f"file:{tmp_path / 'mlruns'}"}}])
    test = ["test", *TINY, "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.logger", logger]
    main(test)
    main([*test, "--model.sampler.num_steps", "3"])
    runs = tmp_path / "run" / "lightning_logs"
    metrics = [json.loads((runs / v / "test_metrics.json").read_text()) for v in ("version_0", "version_1")]
    assert metrics[0] != metrics[1] and all((runs / v / "test_samples" / "samples.json").is_file()
                                            for v in ("version_0", "version_1"))
    assert not list((tmp_path / "mlruns").rglob("test_metrics.json"))


def test_a_resumed_csv_run_keeps_its_metrics_and_a_new_one_is_not_warned(tmp_path):
    """Lightning's CSV writer deletes the metrics.csv it finds ("exists and is not empty"): on --ckpt_path last that
    is the run's history up to the checkpoint (kept, columns the resumed part does not log included; the rows of
    steps trained after the checkpoint are dropped, as they are trained and logged again); a new run's folder holds
    only fnf's lock and config (a false alarm)."""
    fit = ["fit", *TINY, "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(tmp_path),
           "--trainer.log_every_n_steps", "1", "--trainer.logger", json.dumps([csv_logger(tmp_path)])]
    run = tmp_path / "lightning_logs" / "version_0"

    def rows() -> list[dict]:
        with (run / "metrics.csv").open(newline="") as file:
            return list(csv.DictReader(file))

    with pytest.warns() as caught:
        main([*fit, "--trainer.max_steps", "2"])
        warnings.warn("the block's one certain warning", UserWarning)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    early = rows()
    early[0]["val_eval/x"] = "0.5"  # a column only the first part logged
    with (run / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sorted({*early[0], *early[1]}))
        writer.writeheader()
        writer.writerows(early)
    at_step_2 = (run / "checkpoints" / "last.ckpt").read_bytes()
    main([*fit, "--trainer.max_steps", "3", "--ckpt_path", "last"])
    (run / "checkpoints" / "last.ckpt").write_bytes(at_step_2)  # killed after step 3 was logged, before its save
    main([*fit, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert [int(row["step"]) for row in rows() if row.get("train/loss")] == [0, 1, 2, 3]  # each step once
    assert rows()[0]["val_eval/x"] == "0.5" and rows()[0]["train/loss"] == early[0]["train/loss"]
