"""``fnf report``: a self-contained HTML page from real tiny runs (fit, then test with the Evaluation callback),
laid out to read in a 1400-px window: grouped summary table, trade-off plot with the base model at its origin,
empty sections that say why."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

import fnf.report
from fnf.cli import main
from fnf.report import BASE_MODEL, compact, rms_change, run_section, summary_table, tradeoff_figure
from fnf.run_folder import load_run

SCREENSHOT = Path(__file__).parents[1] / "benchmarks" / "report_screenshot.py"
RUNS, HEADS = ("fnf", "draft", "base-test-only"), ("ColorRegion", "ShapesArtifact", "ShapesSafety")
PROMPTS = ("a red circle top left\na blue square bottom right\na green triangle top right\n"
           "a purple diamond bottom left\n")


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory) -> Path:
    """Three tiny runs of the shapes world's heads and judges (the reviewed report's metric set): FNF (λ 0.5)
    and DRaFT (λ 0), each fit 2 steps then tested, and a test-only run of the base model; then their report."""
    folder = tmp_path_factory.mktemp("report")
    (folder / "prompts.txt").write_text(PROMPTS)
    evaluation = {"class_path": "fnf.evaluation.Evaluation", "init_args": {
        "clip": {"class_path": "ShapesAlignment"}, "fid_features": {"class_path": "ShapesAlignment"},
        "judges": [{"class_path": "fnf.worlds.shapes.judge.JudgeRates"}],
        "pair_judges": [{"class_path": "fnf.worlds.shapes.judge.JudgeRepairRates"}],
        "reference": {"head": {"class_path": "fnf.worlds.shapes.judge.JudgeProblemMask"}}, "save_samples": 3}}
    config = {
        "model": {"pretrained": tiny_model_dir, "sampler": {"num_steps": 3, "k": 1}, "lora": {"rank": 4},
                  "rewards": [{"head": {"class_path": name}, "mask": "heatmap"}
                              for name in ("ColorRegion", "ShapesArtifact", "ShapesSafety")]},
        "data": {"train_file": str(folder / "prompts.txt"), "val_file": str(folder / "prompts.txt"),
                 "test_file": str(folder / "prompts.txt"), "batch_size": 2},
        "trainer": {"max_steps": 2, "log_every_n_steps": 1, "limit_val_batches": 0, "enable_progress_bar": False,
                    "callbacks": [evaluation]},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    runs = []
    for name, lam in (("fnf", 0.5), ("draft", 0.0), ("base-test-only", None)):
        run = folder / name
        common = ["--config", str(folder / "config.yaml"), "--trainer.default_root_dir", str(run)]
        if lam is not None:
            main(["fit", *common, "--model.lam", str(lam)])
            common += ["--ckpt_path", str(next(run.rglob("*.ckpt")))]
        main(["test", *common])
        runs.append(str(run))
    main(["report", *runs, "--out", str(folder / "report")])
    return folder / "report"


def _section(page: str, run: str) -> str:
    return page.split(f"<h2>{run}</h2>", 1)[1].split("<h2>", 1)[0]


def test_report_page_embeds_every_image_it_shows(report):
    page = (report / "index.html").read_text()
    images = re.findall(r"<img src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 3 * 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "src='http" not in page and "src=\"http" not in page  # nothing external
    metrics = json.loads((report / "metrics.json").read_text())
    assert set(metrics) == {"fnf", "draft", "base-test-only"} and "outside_psnr" in metrics["fnf"]
    assert "| fnf |" in (report / "metrics.md").read_text()


def test_each_runs_items_pool_to_its_test_metrics(report):
    """test_items.jsonl holds one row per tested item whose parts give back test_metrics.json: mean rewards and
    judge rates, PSNR outside the own and the reference mask pooled over the items."""
    for name in RUNS:
        folder = next((report.parent / name).rglob("test_metrics.json")).parent
        metrics = json.loads((folder / "test_metrics.json").read_text())
        items = [json.loads(line) for line in (folder / "test_items.jsonl").read_text().splitlines()]
        assert [row["prompt"] for row in items] == PROMPTS.splitlines()
        for key in [f"reward_tuned/{head}" for head in HEADS] + ["judge_alignment_tuned", "judge_defect_rate_base"]:
            assert sum(row[key] for row in items) / len(items) == pytest.approx(metrics[key], rel=1e-5, abs=1e-7), key
        for prefix in ("", "reference_"):
            error = sum(row[f"{prefix}outside_sq_error"] for row in items)
            pixels = sum(row[f"{prefix}outside_pixels"] for row in items)
            psnr = 10 * math.log10(pixels / max(error, 1e-20 * pixels))
            assert psnr == pytest.approx(metrics[f"{prefix}outside_psnr"], abs=1e-3), (name, prefix)


def test_each_later_run_is_compared_with_the_first_item_by_item(report):
    """paired.json and the page: draft and the base model against fnf, each difference that of test_metrics."""
    compared = json.loads((report / "paired.json").read_text())
    assert list(compared) == ["draft", "base-test-only"]
    metrics = {name: json.loads(next((report.parent / name).rglob("test_metrics.json")).read_text())
               for name in RUNS}
    for name, differences in compared.items():
        by_metric = {d["metric"]: d for d in differences}
        assert {"judge_defect_rate_tuned", "reference_outside_psnr", "reward_tuned/ShapesSafety"} <= by_metric.keys()
        change = by_metric["reward_tuned/ColorRegion"]
        assert change["difference"] == pytest.approx(
            metrics[name]["reward_tuned/ColorRegion"] - metrics["fnf"]["reward_tuned/ColorRegion"], rel=1e-4, abs=1e-7)
        assert change["low"] <= change["high"]
    page = (report / "index.html").read_text()
    assert "Paired differences against fnf" in page and "draft − fnf" in page
    assert "## draft − fnf, item by item" in (report / "metrics.md").read_text()


def test_summary_table_has_grouped_short_wrapping_headers_and_a_legend(report):
    page = (report / "index.html").read_text()
    groups = re.findall(r"<th colspan='\d+' class='group'>([^<]+)</th>", page)
    assert {g.split(",")[0] for g in groups} == {"Reward change", "Alignment and judges", "Preservation"}
    headers = re.findall(r"<th data-col='\d+' title='([^']*)'>(.*?)</th>", page)
    assert len(headers) >= 14  # reward changes, alignment and judge rates, preservation (a rate of no images: none)
    for keys, label in headers:  # short labels (the metric key is the tooltip), breakable between words
        assert max(len(word) for word in label.replace("<wbr>", " ").split()) <= 12 and "_" not in label, label
    cells = re.findall(r"<td data-value='[^']*' title='[^']*'>([^<]*)</td>", page)
    assert cells and max(len(number) for cell in cells for number in cell.split(" → ")) <= 8  # compact numbers
    defect = json.loads((report / "metrics.json").read_text())["fnf"]["judge_defect_rate_base"]
    assert f"judge_defect_rate_base = {defect!r}" in page  # the full value on hover
    assert "<p class='legend'>" in page and "PSNR 200 dB and SSIM 1 = identical" in page
    assert re.search(r"th\{[^}]*white-space:normal", page)  # header text wraps


def test_too_many_columns_for_one_table_become_one_table_per_group(report, monkeypatch):
    runs = [load_run(report.parent / name) for name in ("fnf", "draft", "base-test-only")]
    one = summary_table(runs)
    monkeypatch.setattr(fnf.report, "TABLE_CHARACTERS", 50)
    split = summary_table(runs)
    assert one.count("<table") == 1 and split.count("<table") == 3 and split.count("<td class='run'") == 3 * 3
    column_keys = r"<th data-col='\d+' title='([^']*)'"
    assert sorted(re.findall(column_keys, one)) == sorted(re.findall(column_keys, split))  # every column once


def test_tradeoff_plot_puts_the_base_model_at_the_origin_inside_the_frame(report):
    page = (report / "index.html").read_text()
    metrics = json.loads((report / "metrics.json").read_text())
    runs = [load_run(report.parent / name) for name in RUNS]
    charts = page.split("<h2>Trade-off across runs</h2>", 1)[1].split("<h2>", 1)[0]
    figures = re.findall(r"<figure class='chart'>(.*?)</figure>", charts, re.S)
    assert len(figures) == 3  # one per reward head
    for figure, head in zip(figures, HEADS):
        axes = tradeoff_figure(runs, head, "reference_outside_psnr", "ref. mask").axes[0]
        titles = (f"{head} reward change, tuned − base (score)", "RMS change outside ref. mask (0–255 levels)")
        assert (axes.get_xlabel(), axes.get_ylabel()) == titles and all(t in figure for t in titles)  # units; text
        points = [(metrics[run][f"reward_change/{head}"], rms_change(metrics[run]["reference_outside_psnr"]))
                  for run in RUNS] + [(0.0, 0.0)]  # the runs, then the base model's marker
        dots = [tuple(collection.get_offsets()[0]) for collection in axes.collections]
        assert [v for dot in dots for v in dot] == pytest.approx([v for point in points for v in point])
        assert dots[2] == pytest.approx((0.0, 0.0), abs=1e-6)  # the base run sits on the origin
        (x0, x1), (y0, y1) = axes.get_xlim(), axes.get_ylim()
        assert all(x0 < x < x1 and y0 < y < y1 for x, y in dots)  # every point strictly inside the frame
        legend = [text.get_text() for text in axes.get_legend().get_texts()]
        assert legend == [*RUNS, BASE_MODEL] and all(name in figure for name in legend)
        assert len(re.findall(r"<text\b", figure)) >= 6 + 2 + 4  # ticks, axis titles and the legend, as text


def test_empty_sections_say_why(report, tmp_path):
    page = (report / "index.html").read_text()
    test_only = _section(page, "base-test-only")
    assert "No training curves in this run (test-only" in test_only and "<svg" not in test_only
    trained = _section(page, "fnf")
    assert "No training curves" not in trained and trained.count("<svg") == 4  # 3 reward curves and the fidelity
    metrics_only = tmp_path / "metrics-only"  # a run folder with test_metrics.json and nothing else
    metrics_only.mkdir()
    metrics = next((report.parent / "fnf").rglob("test_metrics.json"))
    (metrics_only / "test_metrics.json").write_bytes(metrics.read_bytes())
    section = run_section(load_run(metrics_only))
    assert "No training curves in this run" in section and "No samples in this run" in section and "<img" not in section


def test_compact_numbers():
    assert [compact(v) for v in (7.590651e-05, 66.3458, 0.9999939, 1.0, -0.4375, 123456.0)] == [
        "7.59e-5", "66.3", "0.999994", "1", "-0.438", "1.23e5"]
    # near ±1 to the digit that differs (SSIM 0.9999999 is not "identical"); rounded up to 1e5: a short exponent
    assert [compact(v) for v in (0.9999999, 1.0000001, -0.99999, -1.0, 99999.9)] == [
        "0.9999999", "1.0000001", "-0.99999", "-1", "1e5"]


def _browser_module():
    spec = importlib.util.spec_from_file_location("report_screenshot", SCREENSHOT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_fits_a_1400px_window_in_headless_chromium(report):
    browser = _browser_module()
    if browser.find_browser() is None:
        pytest.skip("no headless Chromium / Chrome on PATH (Debian: apt-get install chromium)")
    measured = browser.measure(report / "index.html", width=1400, height=900)
    assert measured["viewport"] <= 1400 and measured["tables"] >= 1 and measured["header_cells"] >= 15
    assert browser.overflows(measured) == [], measured  # no sideways scroll; tables, charts, images inside
    png = browser.screenshot(report / "index.html", report / "screenshot_1400x900.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tested_run(folder: Path, metrics: str = '{"test_eval/reward_change/ShapesArtifact": 0.5}') -> Path:
    """A run folder as ``fnf test`` leaves it, reduced to its metrics file."""
    (folder / "lightning_logs" / "version_0").mkdir(parents=True)
    (folder / "lightning_logs" / "version_0" / "test_metrics.json").write_text(metrics)
    return folder


def _corrupt(case: str, run: Path) -> str:
    """Break ``run`` as ``case`` says; returns the message expected."""
    version = run / "lightning_logs" / "version_0"
    if case == "missing":
        return f"{run / 'nope'}: no such folder"
    if case == "not json":
        (version / "test_metrics.json").write_text('{"a": 1,\n')
        return f"{version / 'test_metrics.json'}: not valid JSON"
    if case == "not metrics":
        (version / "test_metrics.json").write_text('{"a": null}')
        return f"{version / 'test_metrics.json'}: expected an object of metric names and numbers"
    if case == "sample without image":
        (version / "test_samples").mkdir()
        (version / "test_samples" / "samples.json").write_text('[{"prompt": "p", "seed": 0}]')
        return "samples.json: sample 0 lacks image"
    if case == "bad csv":
        (version / "metrics.csv").write_text("step,train/fidelity\n0,0.5\n1,abc\n")
        return f"{version / 'metrics.csv'}:3: not a CSVLogger metrics row"
    if case == "torn items":
        (version / "test_items.jsonl").write_text('{"prompt": "p", "seed": 0}\n{"prompt": "q", "se')
        return f"{version / 'test_items.jsonl'}:2: not valid JSON"
    if case == "the fit's version folder":  # what fnf fit names as the run folder; fnf test wrote version_1
        version.rename(version.with_name("version_1"))
        (version / "checkpoints").mkdir(parents=True)
        return (f"{version}: no test_metrics.json; run `fnf test` with the Evaluation callback first (fnf test writes "
                f"a version folder of its own: {version.with_name('version_1')} has one; or name the runs' "
                f"default_root_dir, {run})")
    if case == "two tested runs":
        _tested_run(run / "again")
        return "holds 2 test results (again/lightning_logs/version_0, lightning_logs/version_0); one run per folder"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "not json", "not metrics", "sample without image", "bad csv",
                                  "torn items", "two tested runs", "the fit's version folder"])
def test_a_bad_run_folder_is_one_line_naming_the_file_and_writes_nothing(case, tmp_path):
    run = _tested_run(tmp_path / "run")
    expected = _corrupt(case, run)
    target = {"missing": run / "nope", "the fit's version folder": run / "lightning_logs/version_0"}.get(case, run)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(target), "--out", str(tmp_path / "report")])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ") and "\n" not in message and expected in message, message
    assert not (tmp_path / "report").exists()


def test_out_replaces_only_an_earlier_report(tmp_path):
    run = _tested_run(tmp_path / "run")
    out = tmp_path / "report"
    main(["report", str(run), "--out", str(out)])
    (out / "stale.txt").write_text("from an earlier report")
    main(["report", str(run), "--out", str(out)])  # an earlier report: replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["fnf_report.json", "index.html", "metrics.json", "metrics.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "run"]  # no staging folder left behind
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target, expected in ((mine, "exists and was not written by fnf report"), (afile, "is a file")):
        with pytest.raises(SystemExit) as exit_info:
            main(["report", str(run), "--out", str(target)])
        assert f"--out: {target} {expected}" in str(exit_info.value.code)
    assert (mine / "index.html").read_text() == "my own page" and afile.read_text() == "x"


def test_a_usage_error_is_one_line_exit_1():
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--out"])
    assert exit_info.value.code == "fnf: error: argument --out: expected one argument"
    for command, flag, closest in ((["report", "runs/a", "--outt", "r"], "--outt", "--out"),
                                   (["report", "runs/a", "--ou", "r"], "--ou", "--out"),  # no prefixes
                                   (["export", "--ckpt_path", "x", "--formt=diffusers"], "--formt", "--format")):
        with pytest.raises(SystemExit) as exit_info:  # not argparse's "required: --format" for --formt
            main(command)
        assert exit_info.value.code == f"fnf: error: {flag}: unknown key; did you mean {closest}?"


def test_rms_change_is_the_rms_pixel_change_in_0_255_levels():
    """PSNR = 20·log10(1 / RMS) at data range 1, so RMS in 0–255 levels is 255·10^(−PSNR/20): 20 dB = 25.5."""
    assert rms_change(20.0) == pytest.approx(25.5)  # RMS 0.1 of the range
    assert rms_change(40.0) == pytest.approx(2.55)  # RMS 0.01
    assert rms_change(0.0) == pytest.approx(255.0)  # RMS = the whole range
    assert rms_change(200.0) == pytest.approx(0.0, abs=1e-6)  # identical images


def test_runs_with_the_same_folder_name_are_named_by_their_paths(tmp_path):
    """Two run folders with one basename (a/run, b/run) keep one row each, named by their folders."""
    first = _tested_run(tmp_path / "a" / "run", '{"test_eval/reward_change/ShapesArtifact": 0.5}')
    second = _tested_run(tmp_path / "b" / "run", '{"test_eval/reward_change/ShapesArtifact": 0.25}')
    main(["report", str(first), str(second), "--out", str(tmp_path / "report")])
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics == {str(first): {"test_eval/reward_change/ShapesArtifact": 0.5},
                       str(second): {"test_eval/reward_change/ShapesArtifact": 0.25}}


def test_judge_cells_read_base_then_tuned_and_sort_by_tuned():
    """A judge or CLIP-score column shows 'base → tuned', keeps both full values in its tooltip, sorts by tuned."""
    runs = [{"name": "r", "metrics": {"judge_defect_rate_base": 0.25, "judge_defect_rate_tuned": 0.125,
                                      "clip_score_base": 0.3125, "clip_score_tuned": 0.34375}}]
    table = summary_table(runs)
    assert ("<td data-value='0.125' title='judge_defect_rate_base = 0.25, judge_defect_rate_tuned = 0.125'>"
            "0.25 → 0.125</td>") in table
    assert ("<td data-value='0.34375' title='clip_score_base = 0.3125, clip_score_tuned = 0.34375'>"
            "0.312 → 0.344</td>") in table
    assert "| run | clip_score_base → clip_score_tuned | judge_defect_rate_base → judge_defect_rate_tuned |" in (
        fnf.report.summary_markdown(runs))


def test_sample_captions_read_base_then_tuned_per_head():
    """Each sample's caption gives per head the reward of the base image, then of the tuned one."""
    sample = {"png": "", "prompt": "a red circle", "seed": 7, "mean_abs_change": 0.0125,
              "reward_base/ColorRegion": -0.5, "reward_tuned/ColorRegion": -0.125,
              "reward_base/ShapesArtifact": 0.75, "reward_tuned/ShapesArtifact": 0.25}
    section = run_section({"name": "r", "folder": "/runs/r", "curves": {}, "samples": [sample]})
    caption = re.search(r"<figcaption>(.*?)</figcaption>", section).group(1)
    assert caption == ("a red circle (seed 7)<br>mean |tuned − base| 0.0125; ColorRegion -0.5 → -0.125; "
                       "ShapesArtifact 0.75 → 0.25")


def test_tradeoff_uses_each_runs_own_mask_unless_every_run_has_the_reference():
    """One run without reference_outside_psnr: every chart reads outside_psnr and plots every run."""
    runs = [{"name": "with-ref", "metrics": {"reward_change/ColorRegion": 0.5, "outside_psnr": 30.0,
                                             "reference_outside_psnr": 35.0}},
            {"name": "without-ref", "metrics": {"reward_change/ColorRegion": 0.25, "outside_psnr": 20.0}}]
    charts = fnf.report.tradeoff_charts(runs)
    assert "from outside_psnr)" in charts and "reference_outside_psnr" not in charts
    assert "not plotted" not in charts and "with-ref" in charts and "without-ref" in charts  # the legend
    runs[1]["metrics"]["reference_outside_psnr"] = 25.0  # every run has it now: the reference mask
    assert "from reference_outside_psnr)" in fnf.report.tradeoff_charts(runs)


def test_a_run_without_finite_numbers_is_named_under_the_chart_not_plotted():
    """A NaN reward change (a diverged run): no dot at NaN, whose axes would go blank, but a note naming the run."""
    runs = [{"name": "fine", "metrics": {"reward_change/ColorRegion": 0.5, "outside_psnr": 30.0}},
            {"name": "diverged", "metrics": {"reward_change/ColorRegion": math.nan, "outside_psnr": 30.0}}]
    figure = fnf.report.tradeoff_figure(runs, "ColorRegion", "outside_psnr", "the run's mask")
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "fine" in legend and "diverged" not in legend
    charts = fnf.report.tradeoff_charts(runs)
    assert "not plotted (no finite reward_change/ColorRegion or outside_psnr): diverged" in charts


def test_an_item_by_item_comparison_names_the_run_without_items():
    """Either side may predate test_items.jsonl: the note names the one that lacks it."""
    items = [{"prompt": "p", "seed": 0, "reward_tuned/h": 1.0}]
    assert fnf.report.paired([{"name": "old", "items": None}, {"name": "new", "items": items}]) == {
        "new": "old has no test_items.jsonl (tested before fnf wrote one)"}
    assert fnf.report.paired([{"name": "new", "items": items}, {"name": "old", "items": None}]) == {
        "old": "old has no test_items.jsonl (tested before fnf wrote one)"}


def test_metrics_json_is_strict_json_and_a_dot_run_has_its_folders_name(tmp_path, monkeypatch):
    """A number of nothing (NaN, a 200-dB cap written as Infinity by older code) is null in metrics.json, which
    strict parsers (JavaScript, jq) then read; ``fnf report .`` names the run after its folder, not ''."""
    run = _tested_run(tmp_path / "artifacts-fnf", '{"reward_change/ShapesArtifact": NaN, "outside_psnr": Infinity, '
                                                  '"judge_defect_rate_tuned": 0.25}')
    monkeypatch.chdir(run)
    main(["report", ".", "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "metrics.json").read_text()
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json")) == {
        "artifacts-fnf": {"reward_change/ShapesArtifact": None, "outside_psnr": None, "judge_defect_rate_tuned": 0.25}}


def test_two_fits_in_one_folder_show_no_mixed_curves(tmp_path):
    """Curves come from every logger file under the folder; with two fits there (two version folders holding
    checkpoints) they would be drawn as one line, the later fit's points overwriting the earlier's: the page says
    so instead. One fit's curves are drawn."""
    run = _tested_run(tmp_path / "root")
    for version, value in (("version_1", 0.5), ("version_2", 0.9)):
        (run / "lightning_logs" / version / "checkpoints").mkdir(parents=True)
        (run / "lightning_logs" / version / "metrics.csv").write_text(f"step,train/fidelity\n0,{value}\n")
    mixed = load_run(run)
    assert mixed["curves"] == {}
    assert "the folder holds 2 fits (lightning_logs/version_1, lightning_logs/version_2)" in run_section(mixed)
    shutil.rmtree(run / "lightning_logs" / "version_2")
    assert load_run(run)["curves"] == {"train/fidelity": [(0, 0.5)]}
