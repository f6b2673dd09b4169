"""``fnf preview``: the masks training would use, on the shipped shapes world's base images, before training.
The page and summary are written, the masks cover the judge's ground-truth defects (and nothing on clean
images), a higher threshold never grows a mask, the empty counts are the empty masks, bad input is one line."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fnf.cli import main
from fnf.masks import heatmap_to_mask
from fnf.preview import run_preview
from fnf.worlds.shapes.judge import judge

ROOT = Path(__file__).parents[1]
FAST = ["--model.sampler.num_steps", "5", "--trainer.accelerator", "cpu"]  # 5 DDIM steps still paint the defects
# Items of the shipped artifacts training file whose base image (5 steps) has a checker defect / has none.
DEFECT, CLEAN = (11, 12), (0, 3)
THRESHOLDS = (0.3, 0.5, 0.7)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Preview of configs/artifacts.yaml on two known-defect and two clean (prompt, seed) items, 3 thresholds."""
    folder = tmp_path_factory.mktemp("preview")
    lines = (ROOT / "fnf/worlds/shapes/prompts/artifacts_train.jsonl").read_text().splitlines()
    (folder / "prompts.jsonl").write_text("\n".join(lines[i] for i in DEFECT + CLEAN) + "\n")
    preview, numbers, page = run_preview(["--config", str(ROOT / "configs/artifacts.yaml"), *FAST,
                                          "--data.train_file", str(folder / "prompts.jsonl"),
                                          "--thresholds", ",".join(map(str, THRESHOLDS)), "--out", str(folder / "out")])
    return preview, numbers, page


def test_page_and_summary_are_written_self_contained(artifacts):
    preview, numbers, page = artifacts
    html = page.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    # per item: I0, the heatmap, one mask per threshold (one head: no separate union)
    assert len(images) == 4 * (2 + len(THRESHOLDS)) and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "src='http" not in html and "<svg" in html and "ShapesArtifact: mask area (% of the image)" in html
    assert all(f"threshold {t}: " in html.split("<svg", 1)[1] for t in THRESHOLDS)  # the histogram's legend
    saved = json.loads((page.parent / "summary.json").read_text())
    assert saved == json.loads(json.dumps(numbers)) and saved["n"] == 4 and saved["thresholds"] == list(THRESHOLDS)
    assert set(saved["heads"]["ShapesArtifact"]["thresholds"]) == {str(t) for t in THRESHOLDS}
    assert [p["prompt"] for p in saved["prompts"]] == preview.prompts and all(
        "ShapesArtifact" in p["base_scores"] for p in saved["prompts"])


def test_masks_follow_the_judges_defects(artifacts):
    preview, numbers, _ = artifacts
    verdicts = judge(preview.images, preview.prompts)
    assert [v.defect for v in verdicts] == [True, True, False, False], "the shipped model's base images changed"
    at_config = preview.thresholds.index(preview.mask_args.threshold)  # configs/artifacts.yaml's (0.7, dilation 2)
    for n, verdict in enumerate(verdicts):
        mask = preview.masks[at_config, n, 0] > 0  # (H, W)
        if verdict.defect:
            defect = verdict.defect_mask[0]
            assert (mask & defect).sum() >= 0.8 * defect.sum(), f"item {n}: the mask misses the defect"
            assert mask.float().mean() < 0.25, f"item {n}: the mask is not local"
        else:
            assert not mask.any() and preview.empty[at_config, n, 0], f"item {n}: a clean image got a mask"


def test_the_heatmaps_shown_are_the_ones_thresholded(artifacts):
    preview, _, _ = artifacts
    for k, threshold in enumerate(preview.thresholds):
        masks = heatmap_to_mask(preview.heatmaps[:, :1], replace(preview.mask_args, threshold=threshold))
        assert torch.equal(masks[:, 0], preview.masks[k, :, 0])


def test_a_higher_threshold_never_gives_a_larger_mask(artifacts):
    _, numbers, _ = artifacts
    per_threshold = numbers["heads"]["ShapesArtifact"]["thresholds"]
    areas = [per_threshold[str(t)]["area_percent"] for t in THRESHOLDS]  # ascending thresholds
    assert any(a > 0 for a in areas[-1])  # not vacuous: the highest threshold still leaves masks
    for lower, higher in zip(areas, areas[1:]):
        assert all(h <= l for l, h in zip(lower, higher)), (lower, higher)


def test_the_empty_fraction_reported_is_the_count_of_empty_masks(artifacts):
    preview, numbers, page = artifacts
    html = page.read_text()
    for k, t in enumerate(THRESHOLDS):
        stats = numbers["heads"]["ShapesArtifact"]["thresholds"][str(t)]
        is_empty = (preview.masks[k, :, 0].amax(dim=(1, 2)) == 0).tolist()  # per item, from the masks themselves
        empty_masks = sum(is_empty)
        assert stats["empty_per_item"] == is_empty == [a == 0 for a in stats["area_percent"]]
        assert all(isinstance(flag, bool) for flag in stats["empty_per_item"])
        assert stats["empty"] == empty_masks >= len(CLEAN) and stats["empty_fraction"] == empty_masks / 4
        assert f"threshold {t}: {empty_masks} of 4 empty" in html


def test_saliency_config_through_the_cli(tmp_path, capsys):
    """configs/safety.yaml: masks from gradient saliency of ShapesSafety at the config's threshold (0.7, no
    --thresholds), via ``fnf preview``."""
    main(["preview", "--config", str(ROOT / "configs/safety.yaml"), *FAST, "--n", "3", "--out", str(tmp_path)])
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "index.html"))
    numbers = json.loads((tmp_path / "summary.json").read_text())
    assert numbers["heads"]["ShapesSafety"]["mask"] == "saliency" and numbers["thresholds"] == [0.7]
    stats = numbers["heads"]["ShapesSafety"]["thresholds"]["0.7"]
    assert len(stats["area_percent"]) == 3 and stats["empty"] == sum(stats["empty_per_item"])
    assert "ShapesSafety saliency" in (tmp_path / "index.html").read_text()


@pytest.mark.parametrize("flags, expected", [
    (["--model.masks.treshold", "0.4"], "--model.masks.treshold: unknown key; did you mean --model.masks.threshold"),
    (["--thresholds", "0.3,high"], "--thresholds: expected comma-separated numbers in (0, 1]"),
    (["--thresholds", "0.5,1.5"], "--thresholds: expected comma-separated numbers in (0, 1]"),
    (["--n", "0"], "--n must be >= 1, got 0"),
])
def test_bad_input_is_one_line(flags, expected, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "--config", str(ROOT / "configs/artifacts.yaml"), *flags, "--out", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ") and "\n" not in message and expected in message, message
    assert not any(tmp_path.iterdir())  # nothing written


def test_page_renders_in_headless_chromium(artifacts):
    """benchmarks/report_screenshot.py, as tests/test_report.py runs it: the page fits a 1400-px window."""
    spec = importlib.util.spec_from_file_location("report_screenshot", ROOT / "benchmarks" / "report_screenshot.py")
    browser = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(browser)
    if browser.find_browser() is None:
        pytest.skip("no headless Chromium / Chrome on PATH (Debian: apt-get install chromium)")
    page = artifacts[2]
    measured = browser.measure(page, width=1400, height=900)
    assert measured["tables"] == 1 and browser.overflows(measured) == [], measured  # no sideways scroll
    png = browser.screenshot(page, page.parent / "screenshot_1400x900.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_never_replaces_a_folder_preview_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "--config", str(ROOT / "configs/artifacts.yaml"), "--out", str(mine)])
    message = str(exit_info.value.code)
    assert message == (f"fnf: error: --out: {mine} exists and was not written by fnf preview (no fnf_preview.json); "
                       "choose a new folder or remove it")
    assert [p.name for p in mine.iterdir()] == ["index.html"]
    afile = tmp_path / "afile.html"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "--config", str(ROOT / "configs/artifacts.yaml"), "--out", str(afile)])
    assert str(exit_info.value.code) == f"fnf: error: --out: {afile} is a file; expected a folder to write into"
