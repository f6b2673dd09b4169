"""Every shipped config instantiates and runs one fit step on the embedded world (STYLE rule 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fnf.cli import main

CONFIGS = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))
WITH_PROMPTS = sorted(str(p) for p in (Path(__file__).parents[1] / "configs").rglob("*.yaml")
                      if p.parent.name != "rahf")  # the shapes world, sd15/*, sdxl/* (rahf/ trains a reward model)


def test_the_main_job_config_exists():
    assert any(p.endswith("configs/artifacts.yaml") for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: Path(p).stem)
def test_config_runs_one_fast_dev_step(config, tmp_path):
    main(["fit", "--config", config, "--trainer.fast_dev_run=true", "--model.sampler.num_steps=3",
          "--model.sampler.k=2", "--data.batch_size=2", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.enable_progress_bar=false"])


@pytest.mark.parametrize("config", WITH_PROMPTS, ids=lambda p: str(Path(p).relative_to(Path(p).parents[1])))
def test_configs_choose_on_val_and_report_on_test_with_the_run_seed(config):
    """Validation (checkpoints, hyperparameters) never reads a test prompt, nor a training one; the data order
    follows seed_everything, so runs of different seeds differ in it (fnf.data.PromptDataModule)."""
    from fnf.prompt_file import read_prompts

    data = yaml.safe_load(Path(config).read_text())["data"]
    root = Path(__file__).parents[1]
    val, test, train = ({row.prompt for row in read_prompts(root / data[key])}
                        for key in ("val_file", "test_file", "train_file"))
    assert data["val_file"] != data["test_file"]
    assert not val & test and not val & train
    assert data.get("seed") is None


def test_every_shipped_config_trains_into_a_root_of_its_own():
    """Two configs sharing trainer.default_root_dir would share --ckpt_path last / auto and fnf report: a test of
    one config's run could load the other's checkpoint (sd15/artifacts and artifacts_richhf did)."""
    roots = {}
    for config in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")):
        root = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("default_root_dir")
        if root is not None:
            assert root not in roots, f"{config} and {roots[root]} both train into {root}"
            roots[root] = config
    assert len(roots) >= 17
