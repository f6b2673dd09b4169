"""``fnf scan`` and ``data.filter``: one row per (prompt, seed) with the base image's scores and mask areas, resumable,
batch- and process-count-independent; the filter trains on exactly the items that meet its criteria."""

from __future__ import annotations

import json
import logging
import signal
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import two_box_config  # tests/conftest.py
from distributed_fit import free_port  # tests/distributed_fit.py
from fnf.cli import main
from fnf.data import PromptDataModule
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.pipeline import LoraArgs, Text2ImageModel
from fnf.rewards.shapes import ShapesArtifact
from fnf.sampling import SamplerArgs
from fnf.scan import summary
from fnf.scan_file import FILTERED_OUT, ScanFilter, append_rows, read_rows, settings_difference
from fnf.worlds.shapes.evaluate_fnf import sample_pair

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fnf/worlds/shapes/prompts/artifacts_train.jsonl"
STEPS = 2  # DDIM steps: enough for the shapes model to paint a defect on some base images


def scan_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["scan", "--config", str(ROOT / "configs/artifacts.yaml"), "--data.train_file", str(prompts),
            "--out", str(out), f"--model.sampler.num_steps={STEPS}", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out.parent / 'root'}", *extra]


def scan(prompts: Path, out: Path, *extra: str) -> list[dict]:
    main(scan_args(prompts, out, *extra))
    return read_rows(out)


def fail(args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ") and "\n" not in message, message
    return message


def assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    """Same items in the same order; values equal up to float32 rounding (batch-size-dependent kernels)."""
    assert [(r["prompt"], r["seed"]) for r in rows] == [(r["prompt"], r["seed"]) for r in expected]
    for row, reference in zip(rows, expected):
        assert row["scores"] == pytest.approx(reference["scores"], rel=1e-4, abs=1e-6)
        assert row["mask_area"] == reference["mask_area"] and row["union_mask_area"] == reference["union_mask_area"]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """4 prompts x 2 seeds of the artifacts training file, scanned in batches of 3 (the last batch is partial)."""
    folder = tmp_path_factory.mktemp("scan")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:4]))
    out = folder / "scan.jsonl"
    return prompts, out, scan(prompts, out, "--data.seeds_per_prompt=2", "--batch_size=3")


def test_one_row_per_item_with_the_base_images_scores_and_mask_areas(scanned):
    prompts, _, rows = scanned
    items = PromptDataModule(seeds_per_prompt=2).load(str(prompts))
    assert [(r["prompt"], r["seed"]) for r in rows] == [(i["prompt"], i["seed"]) for i in items] and len(rows) == 8
    assert all(math.isfinite(r["scores"]["ShapesArtifact"]) for r in rows)
    # Independently: the judge's sampling loop (not FocusNFix) for I0 from each item's x_T, the head, the config's mask.
    model = Text2ImageModel.from_pretrained("embedded:shapes-t2i")
    model.add_lora(LoraArgs(rank=4))
    base, _ = sample_pair(model, [r["prompt"] for r in rows], [r["seed"] for r in rows],
                          SamplerArgs(num_steps=STEPS, guidance_scale=4.0))
    with torch.no_grad():
        output = ShapesArtifact()(base, [r["prompt"] for r in rows])
    masks = yaml.safe_load((ROOT / "configs/artifacts.yaml").read_text())["model"]["masks"]
    areas = heatmap_to_mask(output.heatmap, MaskArgs(threshold=masks["threshold"], dilation=masks["dilation"]))
    areas = areas.mean(dim=(1, 2, 3))
    assert [r["scores"]["ShapesArtifact"] for r in rows] == pytest.approx(output.score.tolist(), rel=1e-4, abs=1e-6)
    assert [r["mask_area"]["ShapesArtifact"] for r in rows] == pytest.approx(areas.tolist(), abs=1e-6)
    assert [r["union_mask_area"] for r in rows] == [r["mask_area"]["ShapesArtifact"] for r in rows]  # one head
    assert 0 < sum(a > 0 for a in areas) < len(rows)  # flawed and clean base images: the filter tests mean something


def test_rows_do_not_depend_on_the_batch_size_or_the_empty_mask_policy(scanned, tmp_path):
    """Areas say where I0 is wrong: masks.empty=global (a clean image's mask = the whole image) must not move them."""
    prompts, _, rows = scanned
    assert_same_rows(scan(prompts, tmp_path / "one.jsonl", "--data.seeds_per_prompt=2", "--batch_size=1",
                          "--model.masks.empty=global"), rows)
    settings = rows[0]["settings"]  # what data.filter compares: the policy is not a scan setting, the guidance is
    assert "empty" not in settings["masks"] and settings["sampler"]["guidance_scale"] > 1


def test_a_torn_scan_resumes_and_ends_as_an_uninterrupted_one(scanned, tmp_path, capsys, monkeypatch):
    prompts, out, rows = scanned
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    torn = tmp_path / "scan.jsonl"
    torn.write_text("".join(lines[:3]) + lines[3][:25])  # a scan stopped while writing its 4th row
    with pytest.raises(ValueError, match=r"^data.filter.scan: .*scan.jsonl: the last line is incomplete"):
        PromptDataModule(train_file=str(prompts), seeds_per_prompt=2,
                         filter=ScanFilter(str(torn), mask_area_above=0.0)).setup("fit")  # the filter refuses it
    capsys.readouterr()
    resumed = scan(prompts, torn, "--data.seeds_per_prompt=2", "--batch_size=3")
    assert "(3 scanned before)" in capsys.readouterr().out
    assert torn.read_text().startswith("".join(lines[:3]))  # kept, not scanned again
    assert_same_rows(resumed, rows)
    again = torn.read_text()
    monkeypatch.setattr("lightning.Trainer.predict", lambda *args, **kwargs: pytest.fail("a complete scan ran"))
    scan(prompts, torn, "--data.seeds_per_prompt=2")  # complete: nothing to do, no trainer run
    assert torn.read_text() == again


def test_filter_trains_on_exactly_the_items_meeting_the_criteria(scanned):
    prompts, out, rows = scanned
    failing = [(r["prompt"], r["seed"]) for r in rows if r["mask_area"]["ShapesArtifact"] > 0]
    low = [(r["prompt"], r["seed"]) for r in rows if r["scores"]["ShapesArtifact"] < -0.2]
    both = [key for key in failing if key in low]
    for criteria, expected in (({"mask_area_above": 0.0}, failing),
                               ({"head": "ShapesArtifact", "score_below": -0.2}, low),
                               ({"head": "ShapesArtifact", "score_below": -0.2, "mask_area_above": 0.0}, both)):
        data = PromptDataModule(train_file=str(prompts), seeds_per_prompt=2, filter=ScanFilter(str(out), **criteria))
        data.setup("fit")
        assert [(i["prompt"], i["seed"]) for i in data.items["train"]] == expected and expected, criteria
        assert "val" not in data.items  # filtered_out: drop
    data = PromptDataModule(train_file=str(prompts), val_file=str(prompts), seeds_per_prompt=2,
                            filter=ScanFilter(str(out), mask_area_above=0.0, filtered_out="validate"))
    data.setup("fit")
    rest = [i for i in data.items["val"] if i.get("category") == FILTERED_OUT]
    assert len(data.items["val"]) == 8 + len(rest) and {(i["prompt"], i["seed"]) for i in rest} == {
        (r["prompt"], r["seed"]) for r in rows} - set(failing)


def test_filter_is_a_config_key_of_fit(scanned, tmp_path, capsys):
    prompts, out, _ = scanned
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/artifacts.yaml"), "--data.filter.scan", str(out),
              "--data.filter.mask_area_above", "0.01", "--print_config"])
    printed = capsys.readouterr().out
    assert f"scan: {out}" in printed and "mask_area_above: 0.01" in printed and "filtered_out: drop" in printed


@pytest.mark.parametrize("criteria, expected", [
    ({"head": "ShapesSafety", "score_below": 0.0}, "data.filter.head: no head 'ShapesSafety' in"),
    ({"score_below": 0.0}, "data.filter.head: score_below reads the score of one reward head"),
    ({}, "data.filter: set score_below and/or mask_area_above"),
    ({"mask_area_above": 1.5}, "data.filter.mask_area_above must be a fraction of the pixels in [0, 1), got 1.5"),
    ({"mask_area_above": 0.99}, "data.filter: none of the 8 training items meets the criteria"),
])
def test_bad_filters_are_one_line_naming_the_key(scanned, criteria, expected):
    prompts, out, _ = scanned
    with pytest.raises(ValueError) as error:
        data = PromptDataModule(train_file=str(prompts), seeds_per_prompt=2, filter=ScanFilter(str(out), **criteria))
        data.setup("fit")
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_filter_needs_the_scan_of_this_train_file(scanned, tmp_path, config):
    prompts, out, _ = scanned
    three_seeds = PromptDataModule(train_file=str(prompts), seeds_per_prompt=3,
                                   filter=ScanFilter(str(out), mask_area_above=0.0))
    with pytest.raises(ValueError, match=r"data.filter.scan: .* has no row for 4 of the 12 training items"):
        three_seeds.setup("fit")
    missing = tmp_path / "missing.jsonl"  # through the CLI: one line naming the key
    message = fail(["fit", "--config", str(config), "--data.filter.scan", str(missing),
                    "--data.filter.mask_area_above=0"])
    assert f"data.filter.scan: {missing}: scan file not found" in message


def test_bad_scan_input_is_one_line(scanned, tmp_path):
    prompts, out, _ = scanned
    message = fail(scan_args(tmp_path / "none.jsonl", tmp_path / "s.jsonl"))
    assert f"data.train_file: {tmp_path / 'none.jsonl'}: prompt file not found" in message
    no_train_file = ["scan", "--config", str(ROOT / "configs/artifacts.yaml"), "--data.train_file=null",
                     "--out=s.jsonl"]
    assert "data.train_file: the prompt file to scan is required" in fail(no_train_file)
    no_out = ["scan", "--config", str(ROOT / "configs/artifacts.yaml")]
    assert "--out: the scan file to write is required" in fail(no_out)
    assert f"--out {tmp_path}: a folder; expected the scan file" in fail(scan_args(prompts, tmp_path))
    assert "--batch_size must be >= 1, got 0" in fail(scan_args(prompts, tmp_path / "s.jsonl", "--batch_size=0"))
    assert "--model.lamda: unknown key; did you mean --model.lam?" in fail(scan_args(prompts, tmp_path / "s.jsonl",
                                                                                   "--model.lamda=1"))
    other_steps = tmp_path / "steps.jsonl"  # the same items, base images sampled with 2 steps; this scan: 3
    shutil.copy(out, other_steps)
    assert ("its rows were scanned with sampler.num_steps=2, this config has 3; scan into another file"
            in fail(scan_args(prompts, other_steps, "--data.seeds_per_prompt=3", "--model.sampler.num_steps=3")))
    assert read_rows(other_steps) == read_rows(out)  # refused before anything was appended
    artifact = "[{head: {class_path: ShapesArtifact, init_args: {topk: 4}}, mask: heatmap}]"  # the head's own args
    assert ("its rows were scanned with heads.ShapesArtifact.head.init_args.topk=16, this config has 4" in
            fail(scan_args(prompts, other_steps, "--data.seeds_per_prompt=3", f"--model.rewards={artifact}")))
    other_heads = tmp_path / "other.jsonl"
    other_heads.write_text(out.read_text().replace('"ShapesArtifact"', '"ShapesSafety"'))
    assert "its rows score the heads ShapesSafety, this config's are ShapesArtifact" in fail(
        scan_args(prompts, other_heads, "--data.seeds_per_prompt=3"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a red circle"}\n')
    assert f"{broken}:1: not a scan row" in fail(scan_args(prompts, broken))
    broken.write_text(json.dumps({**read_rows(out)[0], "scores": [0.5]}) + "\n")  # every key, scores not per head
    assert f"{broken}:1: not a scan row" in fail(scan_args(prompts, broken))
    for seed in ("7", 7.9, True):  # a hand-edited seed: named, not read as another item (int(7.9) = 7)
        broken.write_text(json.dumps({**read_rows(out)[0], "seed": seed}) + "\n")
        assert f"{broken}:1: seed must be an integer (the seed of the item's x_T), got {seed!r}" in fail(
            scan_args(prompts, broken))
    other_size = tmp_path / "size.jsonl"  # base images at another resolution are other images
    shutil.copy(out, other_size)
    assert ("its rows were scanned with sampler.resolution=32, this config has 16" in
            fail(scan_args(prompts, other_size, "--data.seeds_per_prompt=3", "--model.sampler.resolution=16")))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00 not text")
    assert f"{binary}: not a scan file" in fail(scan_args(prompts, binary))
    assert binary.read_bytes() == b"\xff\xfe\x00 not text"  # a foreign file is left as it was


def test_scan_refuses_a_half_precision_lora_and_index_flags_before_the_model_loads(tmp_path,
                                                                                       model_loading_fails):
    """fnf fit's checks come first in a scan too (a large model would load for minutes, then fail), and a list
    item set by index is named as typed, not as jsonargparse's '--0.weight'."""
    out = tmp_path / "s.jsonl"
    assert fail(scan_args(TRAIN, out, "--trainer.precision=bf16-true")).startswith(
        "fnf: error: trainer.precision=bf16-true: LoRA weights, their gradients and optimizer state stay float32 in "
        "fnf; use bf16-mixed")
    assert fail(scan_args(TRAIN, out, "--model.rewards.0.weight", "2")).startswith(
        "fnf: error: --model.rewards.0.weight: list items cannot be set by index on the command line")
    assert not out.exists()


def test_a_scan_failing_before_its_first_row_leaves_no_file(scanned, tmp_path, monkeypatch):
    prompts, _, _ = scanned
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "scan.jsonl"
    assert "forward must return RewardOutput" in fail(scan_args(prompts, out, "--model.rewards=[{head: {class_path: "
                                                           "bad_heads.ReturnsATensor}, mask: none}]"))
    assert not out.exists()  # no empty file for data.filter.scan to trip on


@pytest.mark.slow  # two processes load the model and join a gloo group: 34 s (load 3) to 100 s (load 9) here
def test_two_processes_scan_each_item_once_with_the_single_process_rows(scanned, tmp_path):
    prompts, _, rows = scanned
    shutil.copy(prompts, tmp_path / "prompts.jsonl")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    args = scan_args(tmp_path / "prompts.jsonl", tmp_path / "ddp.jsonl", "--data.seeds_per_prompt=2", "--batch_size=3",
                     "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu")
    done = subprocess.run([sys.executable, "-m", "fnf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = sorted(read_rows(tmp_path / "ddp.jsonl"), key=lambda r: [(x["prompt"], x["seed"]) for x in rows].index(
        (r["prompt"], r["seed"])))  # rows land in the order the processes finish them
    assert_same_rows(two, rows)
    assert len({json.dumps([r["prompt"], r["seed"]]) for r in two}) == len(two) == 8


def test_the_filter_refuses_a_file_that_mixes_settings(scanned, tmp_path):
    prompts, out, rows = scanned
    mixed = tmp_path / "mixed.jsonl"
    changed = rows[-1] | {"settings": rows[-1]["settings"] | {"masks": rows[-1]["settings"]["masks"] | {"dilation": 9}}}
    append_rows(mixed, [*rows[:-1], changed])
    with pytest.raises(ValueError, match=r"^data.filter.scan: .*mixed.jsonl mixes rows scanned with different settings "
                                         r"\(masks.dilation: 2 and 9\); scan into one file per setting$"):
        PromptDataModule(train_file=str(prompts), seeds_per_prompt=2,
                         filter=ScanFilter(str(mixed), mask_area_above=0.0)).setup("fit")


def test_a_row_appended_after_a_torn_line_cuts_it_off(tmp_path):
    """A process killed while writing leaves a torn line; the next append (another process) must not glue onto it."""
    row = {"prompt": "a red circle", "seed": 1, "scores": {"H": 0.5}, "mask_area": {"H": 0.0}, "union_mask_area": 0.0,
           "settings": {}}
    out = tmp_path / "scan.jsonl"
    append_rows(out, [row])
    out.write_bytes(out.read_bytes() + b'{"prompt": "a blue squ')
    append_rows(out, [row | {"seed": 3}])
    assert [r["seed"] for r in read_rows(out)] == [1, 3]  # the torn item has no row: a resumed scan redoes it


def _row(seed: int, areas: dict[str, float | None], union: float | None, score: float = -0.5) -> dict:
    """A hand-written scan row of the prompt 'a red circle'."""
    return {"prompt": "a red circle", "seed": seed, "scores": {name: score for name in areas}, "mask_area": areas,
            "union_mask_area": union, "settings": {}}


def test_mask_area_above_of_a_named_head_reads_that_heads_mask_not_the_union(tmp_path):
    """With ``head``, mask_area_above reads that head's area: an empty mask of A is dropped however large the union."""
    out = tmp_path / "scan.jsonl"
    append_rows(out, [_row(1, {"A": 0.0, "B": 0.5}, 0.5), _row(2, {"A": 0.1, "B": 0.0}, 0.1)])
    items = [{"prompt": "a red circle", "seed": 1}, {"prompt": "a red circle", "seed": 2}]
    kept, dropped = ScanFilter(str(out), head="A", mask_area_above=0.0).split(items)
    assert [i["seed"] for i in kept] == [2] and [i["seed"] for i in dropped] == [1]
    kept, dropped = ScanFilter(str(out), mask_area_above=0.0).split(items)  # no head: the union, non-empty on both
    assert [i["seed"] for i in kept] == [1, 2] and dropped == []


def test_criteria_are_strict_bounds(tmp_path):
    """score_below keeps scores below it, not equal to it; mask_area_above 1.0 could keep nothing: refused."""
    out = tmp_path / "scan.jsonl"
    append_rows(out, [_row(1, {"A": 0.1}, 0.1, score=-0.5), _row(2, {"A": 0.1}, 0.1, score=-0.6)])
    items = [{"prompt": "a red circle", "seed": 1}, {"prompt": "a red circle", "seed": 2}]
    kept, _ = ScanFilter(str(out), head="A", score_below=-0.5).split(items)
    assert [i["seed"] for i in kept] == [2]
    with pytest.raises(ValueError, match=r"mask_area_above must be a fraction of the pixels in \[0, 1\), got 1.0"):
        ScanFilter(str(out), mask_area_above=1.0)


def test_rows_of_other_prompt_files_are_neither_counted_nor_summarised(scanned, tmp_path, capsys):
    """A scan file shared by prompt files: the summary and the 'scanned before' count are this file's items only.
    Nothing left to scan runs no trainer (Lightning would warn that its loader is empty) and leaves the file as is."""
    prompts, out, _ = scanned
    shared, two = tmp_path / "shared.jsonl", tmp_path / "two.jsonl"
    shutil.copy(out, shared)
    two.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan(two, shared, "--data.seeds_per_prompt=2")
    assert f"fnf scan: {shared}: 4 items of {two} (4 scanned before); " in capsys.readouterr().out
    assert not [w for w in caught if "DataLoader" in str(w.message)] and shared.read_bytes() == out.read_bytes()


def test_settings_difference_names_a_key_only_one_side_has():
    """A setting present on one side only is a difference, whichever side lacks it."""
    assert settings_difference({"a": 1}, {"a": 1, "b": 2}) == ("b", "null", "2")
    assert settings_difference({"a": 1, "b": 2}, {"a": 1}) == ("b", "2", "null")
    assert settings_difference({"s": {"x": 1}}, {"s": {"x": 1, "y": [3]}}) == ("s.y", "null", "[3]")
    assert settings_difference({"a": 1, "s": {"x": 1}}, {"a": 1, "s": {"x": 1}}) is None


def test_summary_counts_only_non_empty_masks():
    """'mask not empty on X%' is the share of items whose mask area is > 0 (heads without a mask: no share)."""
    rows = [_row(1, {"A": 0.0, "N": None}, 0.0, score=-1.0), _row(2, {"A": 0.25, "N": None}, 0.25, score=0.5)]
    assert summary(rows, ["A", "N"]) == ("A: mean base score -0.25, mask not empty on 50.0%; "
                                         "N: mean base score -0.25")


def test_a_head_without_a_mask_has_no_area_and_stays_out_of_the_union(config, tmp_path):
    out = tmp_path / "scan.jsonl"
    main(["scan", "--config", str(config), "--out", str(out), "--model.rewards", "[{head: {class_path: ColorRegion}, "
          "mask: heatmap}, {head: {class_path: ColorRegion}, mask: none, name: score_only}]"])
    for row in read_rows(out):
        assert row["mask_area"]["score_only"] is None and row["union_mask_area"] == row["mask_area"]["ColorRegion"]


def test_union_mask_area_is_the_area_of_the_max_over_the_heads_masks(config, tmp_path):
    """union_mask_area is the area of max_i M_i: with masks in disjoint quarters, the sum of the heads' areas."""
    out = tmp_path / "scan.jsonl"
    main(["scan", "--config", str(two_box_config(config, tmp_path)), "--out", str(out)])
    rows = read_rows(out)
    assert len(rows) == 4 and all(list(r["mask_area"]) == ["ColorRegion", "ColorRegion+gradient"] for r in rows)
    for row in rows:
        top_left, bottom_right = row["mask_area"]["ColorRegion"], row["mask_area"]["ColorRegion+gradient"]
        assert 0 < top_left <= 0.25 and 0 < bottom_right <= 0.25, row  # both heads mask something, in their quarter
        assert row["union_mask_area"] == pytest.approx(top_left + bottom_right, abs=1e-6)
        assert row["union_mask_area"] >= max(top_left, bottom_right)


def test_fit_trains_only_on_a_scan_made_with_its_settings(scanned, tmp_path, caplog):
    """Items another model, sampler or mask found failing are not this run's selection: refused before anything is
    written, naming the first difference; a scan made with the fit's settings passes, and the fit says what it
    keeps."""
    prompts, out, _ = scanned
    fit = ["fit", "--config", str(ROOT / "configs/artifacts.yaml"), "--data.train_file", str(prompts),
           "--data.seeds_per_prompt=2", "--data.filter.scan", str(out), "--data.filter.mask_area_above=0",
           f"--trainer.default_root_dir={tmp_path / 'root'}", "--trainer.enable_progress_bar=false"]
    message = fail(fit)  # the config samples 20 steps, the scan took 2
    assert message == (f"fnf: error: data.filter.scan: {out} was scanned with sampler.num_steps=2, this config trains "
                       "with 20; scan data.train_file with this config (`fnf scan --config ... --out` another file)")
    assert not list((tmp_path / "root").rglob("version_*"))
    with caplog.at_level(logging.INFO):
        main([*fit, f"--model.sampler.num_steps={STEPS}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              "--trainer.num_sanity_val_steps=0"])
    kept = sum(row["mask_area"]["ShapesArtifact"] > 0 for row in read_rows(out))
    assert f"fnf: data.filter keeps {kept} of the 8 training items ({out})" in caplog.text


def test_a_ctrl_c_ends_a_scan_with_exit_code_130(scanned, tmp_path, monkeypatch):
    """As a shell reports SIGINT, and as fnf fit does: a script tells an interrupted scan from a failed one (Lightning
    itself exits with 1)."""
    prompts, _, _ = scanned

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr("fnf.scan.PromptScanner.predict_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(scan_args(prompts, tmp_path / "scan.jsonl"))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-Cs once it handles one
    assert exit_info.value.code == 130
