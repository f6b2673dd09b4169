"""What fnf test writes beyond the pooled metrics, checked number by number on hand-made outputs (base all red,
tuned half green, rewards 0 -> 1 and 2): per-category metrics, each item's row, the saved samples and their PNGs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_metrics import _FakeCLIP, _red_then_half_green, _trainer_stub

from fnf.evaluation import Evaluation, sample_row


def _greenness_judge(monkeypatch):
    """JudgeRates whose verdict is 'defect' where an image has any green: the base has none, the tuned image has."""
    from fnf.worlds.shapes import judge as judge_module

    monkeypatch.setattr(judge_module, "judge", lambda images, prompts: [
        SimpleNamespace(aligned=True, defect=bool(image[1].amax() > 0.5), unsafe=False) for image in images])
    return judge_module.JudgeRates()


def test_each_category_gets_its_own_numbers_and_each_item_its_row(tiny_model_dir, tmp_path, monkeypatch):
    """Items a (reward 0 -> 1) and b (0 -> 2) in two categories: each category's reward change is its own, FID is
    reported for the whole set only (per category it would rest on a handful of images), and each item's row
    carries its category and its judge verdicts on base and tuned image."""
    module, outputs = _red_then_half_green(tiny_model_dir)
    evaluation = Evaluation(fid_features=_FakeCLIP(), judges=[_greenness_judge(monkeypatch)],
                            output_dir=str(tmp_path))
    evaluation.on_test_epoch_start(_trainer_stub(tmp_path), module)
    evaluation.on_test_batch_end(_trainer_stub(tmp_path), module, outputs, {"seed": [3, 4], "category": ["a", "b"]}, 0)
    evaluation._finish("test", _trainer_stub(tmp_path), module)
    values = json.loads((tmp_path / "test_metrics.json").read_text())
    assert values["category/a/reward_change/ColorRegion"] == pytest.approx(1.0)
    assert values["category/b/reward_change/ColorRegion"] == pytest.approx(2.0)
    assert values["reward_change/ColorRegion"] == pytest.approx(1.5)
    assert "fid_tuned_vs_base" in values and not any(k.startswith("category/") and "fid" in k for k in values)
    assert (values["judge_defect_rate_base"], values["judge_defect_rate_tuned"]) == (0.0, 1.0)
    rows = [json.loads(line) for line in (tmp_path / "test_items.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["category"]) for r in rows] == [(3, "a"), (4, "b")]
    assert [(r["judge_defect_rate_base"], r["judge_defect_rate_tuned"]) for r in rows] == [(0.0, 1.0)] * 2


def test_fid_of_one_image_has_no_row_instead_of_stopping_the_run(tiny_model_dir, tmp_path):
    """A validation set of one item (data.val_items 1) got torchmetrics' "more than one sample is required" at the
    first validation, mid-fit: FID is left out with a warning, every other metric is reported."""
    module, outputs = _red_then_half_green(tiny_model_dir)
    one = {k: v[:1] for k, v in outputs.items()}
    evaluation = Evaluation(fid_features=_FakeCLIP(), output_dir=str(tmp_path))
    evaluation.on_test_epoch_start(_trainer_stub(tmp_path), module)
    evaluation.on_test_batch_end(_trainer_stub(tmp_path), module, one, {"seed": [3]}, 0)
    with pytest.warns(UserWarning, match="test: no fid_tuned_vs_base: More than one sample is required"):
        evaluation._finish("test", _trainer_stub(tmp_path), module)
    values = json.loads((tmp_path / "test_metrics.json").read_text())
    assert "fid_tuned_vs_base" not in values and values["reward_change/ColorRegion"] == pytest.approx(1.0)


def test_save_samples_keeps_the_first_items_and_their_png_rows_read_base_tuned_heatmap_mask_change(
        tiny_model_dir, tmp_path):
    """save_samples 1 of 2 items: one PNG; its columns are base | tuned | heatmap | mask | |tuned − base|×4, each
    framed by a 1-pixel padding; samples.json's mean_abs_change is mean |tuned − base| (half the pixels change
    from red to green: 2/3 per changed pixel, 1/3 overall)."""
    module, outputs = _red_then_half_green(tiny_model_dir)
    evaluation = Evaluation(output_dir=str(tmp_path), save_samples=1)
    evaluation.on_test_epoch_start(_trainer_stub(tmp_path), module)
    evaluation.on_test_batch_end(_trainer_stub(tmp_path), module, outputs, {"seed": [3, 4]}, 0)
    evaluation._finish("test", _trainer_stub(tmp_path), module)
    saved = json.loads((tmp_path / "test_samples" / "samples.json").read_text())
    assert [(s["seed"], s["image"]) for s in saved] == [(3, "000.png")]
    assert saved[0]["mean_abs_change"] == pytest.approx(1 / 3)
    assert sorted(p.name for p in (tmp_path / "test_samples").iterdir()) == ["000.png", "samples.json"]

    side = 4
    images = torch.stack([torch.full((3, side, side), value) for value in (0.1, 0.3, 0.5, 0.7)])
    row = sample_row({"images": images})
    columns = [row[:, 1:1 + side, 1 + c * (side + 1):1 + c * (side + 1) + side] for c in range(5)]
    for column, value in zip(columns, (0.1, 0.3, 0.5, 0.7, 0.8)):  # the last: |0.3 − 0.1| × 4
        torch.testing.assert_close(column, torch.full((3, side, side), value))
