"""``fnf report``: a self-contained HTML page from real tiny runs (fit, then test with the Evaluation callback)."""

from __future__ import annotations

import base64
import json
import re

from fnf.cli import main


def _run(config, tmp_path, name: str, lam: float):
    run = tmp_path / name
    common = ["--config", str(config), "--trainer.default_root_dir", str(run), "--model.lam", str(lam)]
    main(["fit", *common, "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1"])
    checkpoint = next(run.rglob("*.ckpt"))
    main(["test", *common, "--data.test_file", str(tmp_path / "prompts.txt"), "--ckpt_path", str(checkpoint),
          "--trainer.callbacks+=fnf.evaluation.Evaluation", "--trainer.callbacks.save_samples", "3"])
    return run


def test_report_page_embeds_every_image_it_shows(config, tmp_path):
    runs = [_run(config, tmp_path, "fnf", 0.5), _run(config, tmp_path, "draft", 0.0)]
    main(["report", *map(str, runs), "--out", str(tmp_path / "report")])
    page = (tmp_path / "report" / "index.html").read_text()
    images = re.findall(r"<img src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2 * 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "src='http" not in page and "src=\"http" not in page  # nothing external
    assert page.count("<polyline") >= 2 and "<circle" in page  # reward curves and the trade-off scatter
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics) == {"fnf", "draft"} and "outside_psnr" in metrics["fnf"]
    assert "| fnf |" in (tmp_path / "report" / "metrics.md").read_text()
