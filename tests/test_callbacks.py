"""Run outputs: TensorBoard image grids during fit (every other logger: tests/test_loggers.py)."""

from __future__ import annotations

import csv
import shutil
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from fnf.callbacks import ImageGridLogger


class _Trainer:
    def __init__(self, logger, step):
        self.loggers, self.global_step, self.is_global_zero = [logger], step, True


def test_image_grid_logger_writes_base_tuned_mask_difference_rows(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    images = {"base": torch.rand(3, 3, 8, 8), "tuned": torch.rand(3, 3, 8, 8), "mask": torch.ones(3, 1, 8, 8)}
    written = []
    logger.experiment.add_image = lambda tag, grid, step: written.append((tag, grid.shape, step))
    callback = ImageGridLogger(every_n_steps=10, max_images=2)
    callback.on_train_batch_end(_Trainer(logger, 5), None, images, None, 0)  # not a logging step
    callback.on_train_batch_end(_Trainer(logger, 10), None, images, None, 0)
    callback.on_train_batch_end(_Trainer(logger, 20), None, None, None, 0)  # skipped batch: no outputs
    assert len(written) == 1
    tag, shape, step = written[0]
    assert step == 10 and shape[0] == 3
    assert shape[1] == 2 * (8 + 2) + 2 and shape[2] == 4 * (8 + 2) + 2  # 2 rows × 4 columns with padding 2


def test_image_grid_cells_are_base_tuned_mask_overlay_and_amplified_difference(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    base, tuned = torch.full((1, 3, 8, 8), 0.5), torch.full((1, 3, 8, 8), 0.5)
    tuned[..., :4] += 0.1  # a change of 0.1 on the left half shows as 0.4
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:, :] = 1  # the bottom half may change
    grids = []
    logger.experiment.add_image = lambda tag, grid, step: grids.append(grid)
    ImageGridLogger(every_n_steps=1).on_train_batch_end(_Trainer(logger, 1), None,
                                                        {"base": base, "tuned": tuned, "mask": mask}, None, 0)
    cells = [grids[0][:, 2:10, 2 + 10 * column: 10 + 10 * column] for column in range(4)]  # padding 2
    torch.testing.assert_close(cells[0], base[0])
    torch.testing.assert_close(cells[1], tuned[0])
    red = torch.tensor([0.5, 0.0, 0.0])[:, None]
    torch.testing.assert_close(cells[2][:, 4:], 0.25 + red.expand(3, 8)[:, None, :].expand(3, 4, 8))  # half red
    torch.testing.assert_close(cells[2][:, :4], base[0][:, :4])
    torch.testing.assert_close(cells[3][..., :4], torch.full((3, 8, 4), 0.4))
    assert cells[3][..., 4:].abs().max() < 1e-6


def test_image_grid_logger_shows_the_tuned_images_when_the_step_skipped_the_base_pass(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    written = []
    logger.experiment.add_image = lambda tag, grid, step: written.append((tag, grid.shape, step))
    outputs = {"tuned": torch.rand(3, 3, 8, 8)}  # model.train_base: if_needed with λ = 0
    ImageGridLogger(every_n_steps=10, max_images=2).on_train_batch_end(_Trainer(logger, 10), None, outputs, None, 0)
    (tag, shape, step), = written
    assert tag == "train/tuned" and step == 10 and shape[1:] == (8 + 4, 2 * (8 + 2) + 2)  # one row of 2 images


def _predict_trainer(rank: int = 0, world: int = 1) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=rank == 0, global_rank=rank, world_size=world,
                           strategy=SimpleNamespace(barrier=lambda: None, broadcast=lambda obj: obj))


def test_png_writer_puts_each_image_under_its_own_kind(tmp_path):
    """fnf predict's files: tuned/ and base/ hold the images of their names (the item's place in the prompt file,
    its seed), indexed by prompts.tsv once every image is written; a prompt with a tab stays one cell."""
    from PIL import Image

    from fnf.callbacks import PngWriter

    writer, trainer = PngWriter(str(tmp_path / "out")), _predict_trainer()
    prediction = {"prompt": ["a red circle", "a blue\tsquare"], "seed": [7, 8],
                  "base": torch.zeros(2, 3, 4, 4), "tuned": torch.ones(2, 3, 4, 4)}
    for batches in (2, 1):  # a second run into the same folder: only its own images are there
        writer.on_predict_start(trainer, None)
        for batch_idx in range(batches):
            writer.write_on_batch_end(trainer, None, prediction, None, None, batch_idx)
        assert (tmp_path / "out" / "prompts.tsv").read_text() == "file\tseed\tprompt\n"  # no index before the end
        writer.on_predict_end(trainer, None)
    for kind, value in (("base", 0), ("tuned", 255)):
        files = sorted((tmp_path / "out" / kind).glob("*.png"))
        assert [f.name for f in files] == ["00000_7.png", "00001_8.png"]
        assert all(set(Image.open(f).getdata()) == {(value,) * 3} for f in files)
    with open(tmp_path / "out" / "prompts.tsv", newline="") as index:
        assert list(csv.reader(index, delimiter="\t")) == [
            ["file", "seed", "prompt"], ["00000_7.png", "7", "a red circle"], ["00001_8.png", "8", "a blue\tsquare"]]
    shutil.rmtree(tmp_path / "out" / "tuned")
    (tmp_path / "out" / "tuned").write_text("")  # a file where a kind's folder goes: replaced too
    writer.on_predict_start(trainer, None)
    assert (tmp_path / "out" / "tuned").is_dir() and not list((tmp_path / "out" / "tuned").iterdir())


def test_png_writer_names_follow_the_prompt_file_on_every_rank(tmp_path):
    """Rank 1 of 2 predicts items 1, 3, ...: its names never meet rank 0's, even when every prompt has one seed."""
    from fnf.callbacks import PngWriter

    writer, trainer = PngWriter(str(tmp_path)), _predict_trainer(rank=1, world=2)
    for kind in PngWriter.KINDS:
        (tmp_path / kind).mkdir()
    prediction = {"prompt": ["p", "q"], "seed": [0, 0], "base": torch.zeros(2, 3, 4, 4), "tuned": torch.ones(2, 3, 4, 4)}
    writer.write_on_batch_end(trainer, None, prediction, None, None, 0)
    writer.write_on_batch_end(trainer, None, prediction, None, None, 1)
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == ["00001_0.png", "00003_0.png", "00005_0.png",
                                                                      "00007_0.png"]


def test_png_writer_refuses_a_folder_it_did_not_write(tmp_path):
    from fnf.callbacks import PngWriter

    (tmp_path / "notes.txt").write_text("precious\n")
    trainer = _predict_trainer()
    with pytest.raises(ValueError, match=r"predict_writer.output_dir: .* holds notes.txt and was not written by fnf predict \(no prompts.tsv\)"):
        PngWriter(str(tmp_path)).on_predict_start(trainer, None)
    with pytest.raises(ValueError, match="notes.txt is a file; expected a folder to write into"):
        PngWriter(str(tmp_path / "notes.txt")).on_predict_start(trainer, None)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_fnf_predict_refuses_a_foreign_output_folder_before_the_model_loads(config, tmp_path, model_loading_fails):
    from fnf.cli import main

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("precious\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(config), "--predict_writer.output_dir", str(tmp_path / "notes")])
    assert str(exit_info.value.code).startswith("fnf: error: predict_writer.output_dir: "), exit_info.value.code
    assert "holds notes.txt and was not written by fnf predict" in str(exit_info.value.code)
