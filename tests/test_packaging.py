"""A wheel of fnf (``pip install .``, not editable) holds every file the package reads at run time: the embedded
weights and prompt files are data files, which setuptools leaves out unless ``package-data`` names them."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_every_data_file_of_the_package_is_named_by_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fnf"]
    package = REPO / "fnf"
    data = [p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert any(p.suffix == ".jsonl" for p in data) and any(p.suffix == ".safetensors" for p in data)
    named = {p for pattern in patterns for p in package.glob(pattern)}  # setuptools' glob: ** is any depth
    missed = [p.relative_to(package).as_posix() for p in data if p not in named]
    assert not missed, f"not in a wheel: {missed}"
