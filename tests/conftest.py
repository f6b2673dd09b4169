"""Shared fixtures: a tiny, seeded, random SD1.x-shaped model in diffusers format (STYLE rule 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fnf.worlds.random_sd import build_random_sd


def pytest_addoption(parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """16×16 RGB images, VAE factor 2, 8×8×4 latents, 2-layer 32-wide CLIP text encoder (~1.5M params)."""
    return str(build_random_sd(tmp_path_factory.mktemp("tiny-sd") / "model"))


@pytest.fixture()
def config(tiny_model_dir, tmp_path) -> Path:
    """A 2-step ``fnf fit`` config on the tiny model (4 prompts, batch 2); tests edit it to break it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle top left\na blue square bottom right\na green circle\na red square\n")
    config = {
        "model": {"pretrained": tiny_model_dir, "lam": 0.1, "sampler": {"num_steps": 3, "k": 1},
                  "lora": {"rank": 4}, "rewards": [{"head": {"class_path": "ColorRegion"}, "mask": "heatmap"}]},
        "data": {"train_file": str(prompts), "val_file": str(prompts), "batch_size": 2},
        "trainer": {"max_steps": 2, "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False},
        "predict_writer": {"output_dir": str(tmp_path / "predictions")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
