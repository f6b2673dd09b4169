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

from conftest import two_box_config  # tests/conftest.py
from fnf.cli import main
from fnf.masks import MaskArgs, heatmap_to_mask
from fnf.preview import Preview, parse_thresholds, run_preview, summary
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


def test_saliency_config_through_the_cli(tmp_path, capsys, caplog):
    """configs/safety.yaml: masks from gradient saliency of ShapesSafety at the config's threshold (0.7, no
    --thresholds), via ``fnf preview``; a DDP trainer section is said to run as one process."""
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    with caplog.at_level("INFO"):
        main(["preview", "--config", str(ROOT / "configs/safety.yaml"), *FAST, *ddp, "--n", "3", "--out",
              str(tmp_path)])
    assert "fnf preview: one process on cpu (the config's 2 processes are for fnf fit" in caplog.text
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
    (["--thresholds", "0,0.5"], "--thresholds: expected comma-separated numbers in (0, 1]"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--data.train_file", "nope.jsonl"], "data.train_file: nope.jsonl: prompt file not found"),
])
def test_bad_input_is_one_line(flags, expected, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "--config", str(ROOT / "configs/artifacts.yaml"), *flags, "--out", str(tmp_path)])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ") and "\n" not in message and expected in message, message
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_half_precision_lora_is_refused_before_the_model_loads(tmp_path, model_loading_fails):
    """fnf fit's precision check comes first in preview too: a large model would load for minutes, then fail."""
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", "--config", str(ROOT / "configs/artifacts.yaml"), "--trainer.precision", "bf16-true",
              "--out", str(tmp_path / "out")])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: trainer.precision=bf16-true: LoRA weights, their gradients and optimizer "
                              "state stay float32 in fnf; use bf16-mixed"), message
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


def test_zero_is_no_threshold():
    """A threshold must be in (0, 1]: 0 would mask every pixel, so it is refused like any bad value."""
    with pytest.raises(ValueError, match=r"^--thresholds: expected comma-separated numbers in \(0, 1\]"):
        parse_thresholds("0,0.5", [0.7])
    assert parse_thresholds("0.5,0.001,1", [0.7]) == [0.001, 0.5, 1.0]
    assert parse_thresholds(None, [0.5, 0.25, 0.5]) == [0.25, 0.5]  # masks.threshold and the heads' own


def _two_head_preview() -> Preview:
    """One threshold, 3 items of 2×2 pixels, two masked heads A, B and an unmasked C: A only; none; A and B
    (overlapping in one pixel)."""
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])
    b = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])
    masks = torch.stack([a, b, torch.zeros_like(a)], dim=1)[None]  # (T=1, N=3, heads=3, 2, 2)
    empty = torch.tensor([[[False, True, False], [True, True, False], [False, False, False]]])
    return Preview(prompts=["p0", "p1", "p2"], seeds=[0, 1, 2], images=torch.zeros(3, 3, 2, 2),
                   heatmaps=torch.zeros(3, 3, 2, 2), masks=masks, empty=empty, scores=torch.zeros(3, 3),
                   thresholds=[0.5], heads=["A", "B", "C"], sources=["heatmap", "saliency", "none"],
                   mask_args=MaskArgs())


def test_union_of_two_heads_is_their_max_and_empty_only_when_every_mask_is():
    """The union mask is max over the masked heads: its area is that of the pixel-wise max (not a mean), and it is
    empty only when every head's mask is."""
    numbers = summary(_two_head_preview(), "config.yaml", "prompts.txt")
    union = numbers["union"]["thresholds"]["0.5"]
    assert union["area_percent"] == pytest.approx([25.0, 0.0, 100.0])  # 1, 0 and 4 of 4 pixels
    assert union["empty_per_item"] == [False, True, False] and union["empty"] == 1
    for head, areas in (("A", [25.0, 0.0, 50.0]), ("B", [0.0, 0.0, 75.0])):
        assert numbers["heads"][head]["thresholds"]["0.5"]["area_percent"] == pytest.approx(areas)
        assert all(u >= a for u, a in zip(union["area_percent"], areas))
    assert "thresholds" not in numbers["heads"]["C"]  # mask: none: no statistics, not in the union


def test_histogram_counts_only_the_non_empty_masks():
    """The histogram of mask areas holds one count per non-empty mask: its counts sum to the non-empty masks."""
    numbers = summary(_two_head_preview(), "config.yaml", "prompts.txt")
    for stats, non_empty in ((numbers["heads"]["A"]["thresholds"]["0.5"], 2),
                             (numbers["heads"]["B"]["thresholds"]["0.5"], 1),
                             (numbers["union"]["thresholds"]["0.5"], 2)):
        assert sum(stats["histogram_of_non_empty"]["counts"]) == non_empty == 3 - stats["empty"]


def test_the_shipped_histogram_leaves_out_the_empty_masks(artifacts):
    """On the artifacts preview (clean images: empty masks), each histogram counts the non-empty masks only."""
    _, numbers, _ = artifacts
    for t in THRESHOLDS:
        stats = numbers["heads"]["ShapesArtifact"]["thresholds"][str(t)]
        assert stats["empty"] >= len(CLEAN)
        assert sum(stats["histogram_of_non_empty"]["counts"]) == 4 - stats["empty"]


def test_a_two_head_config_previews_the_union_of_its_masks(config, tmp_path, caplog):
    """Two masked heads through ``fnf preview``: ColorRegion (top left, never empty here) and a saliency head that
    finds every image clean (empty masks): the union is ColorRegion's mask, never empty, and no histogram counts
    the empty masks. --n beyond the file's 4 items previews the 4 and says so."""
    two_heads = two_box_config(config, tmp_path, clean_score=-2.0)  # ColorRegion's score is >= -1: all clean
    with caplog.at_level("INFO"):
        preview, numbers, _ = run_preview(["--config", str(two_heads), "--trainer.accelerator", "cpu",
                                           "--n", "1000", "--out", str(tmp_path / "out")])
    assert "holds 4 (prompt, seed) items; previewing all of them (--n 1000 asked for more)" in caplog.text
    assert preview.heads == ["ColorRegion", "ColorRegion+gradient"] and preview.masked == [0, 1]
    region, clean = (numbers["heads"][name]["thresholds"]["0.05"] for name in preview.heads)
    union = numbers["union"]["thresholds"]["0.05"]
    assert region["empty"] == 0 and clean["empty_per_item"] == [True] * 4  # the premise: one head always empty
    assert union["empty_per_item"] == [False] * 4
    assert union["area_percent"] == pytest.approx(region["area_percent"])  # max(M, 0) = M, not its mean with 0
    assert all(u >= max(a, b) for u, a, b in zip(union["area_percent"], region["area_percent"],
                                                 clean["area_percent"]))
    assert sum(clean["histogram_of_non_empty"]["counts"]) == 0
    assert sum(region["histogram_of_non_empty"]["counts"]) == sum(union["histogram_of_non_empty"]["counts"]) == 4


def test_a_threshold_column_cuts_every_heads_map_also_of_a_head_with_its_own(tiny_model_dir):
    """One column, one cut: a head's own threshold (model.rewards[i].threshold) is what the preview helps to choose,
    so the column's threshold replaces it there; the head keeps its own afterwards."""
    from test_module import _module

    from fnf.module import RewardTerm
    from fnf.preview import masks_at
    from fnf.rewards import ColorRegion

    module = _module(tiny_model_dir, lam=1.0, mask_mode="per_head", masks=MaskArgs(threshold=0.5, dilation=0),
                     rewards=[RewardTerm(ColorRegion(), name="run"), RewardTerm(ColorRegion(), threshold=0.25)])
    halves = torch.full((1, 1, 4, 4), 0.3)
    halves[..., 2:] = 0.6
    module.problem_heatmaps = lambda images, prompts: ([halves, halves], torch.zeros(1, 2))
    for threshold, area in ((0.5, 0.5), (0.25, 1.0)):
        masks, _, _ = masks_at(module, torch.zeros(1, 3, 4, 4), [""], replace(module.mask_args, threshold=threshold))
        assert [masks[0, i].mean().item() for i in range(2)] == [area, area]
    assert [term.threshold for term in module.terms] == [None, 0.25]


def test_preview_stores_the_frozen_weights_as_fit_does(config, tmp_path, monkeypatch):
    """Under bf16-mixed fit keeps the frozen weights in bfloat16 (model.compute.frozen_dtype: auto): the preview's
    I0 and masks come from the same weights, and it needs no more memory than fit; LoRA weights stay float32."""
    import fnf.preview

    seen, preview_items = {}, fnf.preview.preview_items

    def recording(model, *args):
        frozen = {p.dtype for n, p in model.model.unet.named_parameters() if "lora_" not in n}
        seen["frozen"], seen["lora"] = frozen, {p.dtype for p in model.model.lora_parameters()}
        return preview_items(model, *args)

    monkeypatch.setattr(fnf.preview, "preview_items", recording)
    run_preview(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed",
                 "--n", "2", "--out", str(tmp_path / "out")])
    assert seen == {"frozen": {torch.bfloat16}, "lora": {torch.float32}}
