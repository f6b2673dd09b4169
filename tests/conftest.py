"""Shared fixtures: a tiny, seeded, random SD1.x-shaped model in diffusers format (STYLE rule 9)."""

from __future__ import annotations

import pytest

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
