"""fnf report reads W&B's history from the run file itself: a real offline run written by wandb, one row larger
than a 32 KiB block (so split over chunks), then the same file cut short by a crash, corrupted, or not W&B's."""

from __future__ import annotations

from pathlib import Path

import pytest

from fnf.wandb_history import BLOCK, history

pytest.importorskip("wandb")

WIDE = 3000  # keys in the wide row: ~30 bytes each, over one block


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    import wandb

    folder = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_MODE", "offline")
        run = wandb.init(dir=folder, project="fnf-test")
        for step in range(4):
            run.log({"train/fidelity": 1 / (step + 1), "trainer/global_step": step, "note": "text is skipped"})
        run.log({f"wide/{i}": float(i) for i in range(WIDE)})
        run.log({"train/fidelity": float("nan"), "trainer/global_step": 4})
        run.finish()
        wandb.teardown()  # W&B's process-wide settings would outlive this module's environment
    found, = folder.rglob("run-*.wandb")
    return found


def test_rows_come_back_as_logged_including_one_larger_than_a_block(run_file):
    assert run_file.stat().st_size > BLOCK
    rows = list(history(run_file))
    logged = [row for row in rows if "train/fidelity" in row]
    assert [row["trainer/global_step"] for row in logged] == [0, 1, 2, 3, 4]
    assert [row["train/fidelity"] for row in logged[:4]] == [1, 0.5, 1 / 3, 0.25]
    assert logged[4]["train/fidelity"] != logged[4]["train/fidelity"]  # NaN survives
    assert all("note" not in row for row in rows)
    wide, = [row for row in rows if "wide/0" in row]
    assert [wide[f"wide/{i}"] for i in range(WIDE)] == list(range(WIDE))


def test_a_file_cut_short_by_a_crash_reads_up_to_the_cut(run_file, tmp_path):
    data = run_file.read_bytes()
    complete = [row.get("trainer/global_step") for row in history(run_file) if "train/fidelity" in row]
    for cut in (BLOCK + 100, len(data) - 3):
        cut_file = tmp_path / f"run-cut{cut}.wandb"
        cut_file.write_bytes(data[:cut])
        steps = [row.get("trainer/global_step") for row in history(cut_file) if "train/fidelity" in row]
        assert steps == complete[:len(steps)]
        assert len(steps) >= 4  # the rows before the wide one precede the cut


def test_a_corrupt_record_and_a_foreign_file_are_named(run_file, tmp_path):
    data = bytearray(run_file.read_bytes())
    data[40] ^= 0xFF
    corrupt = tmp_path / "run-corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"run-corrupt\.wandb: corrupt record at byte 7"):
        list(history(corrupt))
    foreign = tmp_path / "run-foreign.wandb"
    foreign.write_text("not a run")
    with pytest.raises(ValueError, match=r"run-foreign\.wandb: not a W&B run file"):
        list(history(foreign))
