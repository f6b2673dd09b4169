"""Every shipped config instantiates and runs one fit step on the embedded world (STYLE rule 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fnf.cli import main

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_the_main_job_config_exists():
    assert any(p.endswith("configs/artifacts.yaml") for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).stem)
def test_config_runs_one_fast_dev_step(config, tmp_path):
    main(["fit", "--config", config, "--trainer.fast_dev_run=true", "--model.sampler.num_steps=3",
          "--data.batch_size=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
