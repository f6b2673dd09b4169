"""Reward plugins by entry point: a package installed with pip is listed by ``fnf rewards`` and its head is usable
by its short name in YAML (tests/fixtures/fnf_plugin_demo, installed into a temporary folder, not the venv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fnf.cli import main

PLUGIN = Path(__file__).parent / "fixtures" / "fnf_plugin_demo"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(PLUGIN)], check=True, capture_output=True)
    assert (target / "fnf_plugin_demo").is_dir() and list(target.glob("fnf_plugin_demo-*.dist-info"))
    return target


def _fnf(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "fnf.cli", *args], env=env, capture_output=True, text=True)


def test_fnf_rewards_lists_built_in_and_installed_heads(site):
    listing = _fnf(site, "rewards")
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if line and not line.startswith(" ")}
    assert rows["DemoBlueness"].split()[1] == "yes" and rows["DemoBlueness"].endswith("[plugin]")
    assert "Rewards blue images" in listing.stdout
    assert rows["ShapesSafety"].split()[1] == "optional" and rows["ShapesAlignment"].split()[1] == "no"
    assert "[plugin]" not in rows["ColorRegion"]
    without = _fnf(Path("/nonexistent"), "rewards")  # the plugin is not installed there
    assert without.returncode == 0 and "DemoBlueness" not in without.stdout


def test_an_installed_head_trains_by_its_short_name(site, config, tmp_path):
    data = yaml.safe_load(config.read_text())
    data["model"]["rewards"] = [{"head": {"class_path": "DemoBlueness"}, "mask": "heatmap"}]
    data["trainer"]["max_steps"] = 1
    config.write_text(yaml.safe_dump(data))
    fit = _fnf(site, "fit", "--config", str(config))
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert "DemoBlueness" in (next((tmp_path / "run").rglob("config.yaml"))).read_text()
    missing = _fnf(Path("/nonexistent"), "fit", "--config", str(config))  # not installed: one line, the name
    assert missing.returncode == 1 and "DemoBlueness" in missing.stderr.strip().splitlines()[-1]


def test_a_broken_entry_point_is_one_line(site, tmp_path, monkeypatch):
    broken = tmp_path / "broken-site"
    (broken / "fnf_broken-0.1.dist-info").mkdir(parents=True)
    (broken / "fnf_broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fnf-broken\n"
                                                                   "Version: 0.1\n")
    (broken / "fnf_broken-0.1.dist-info" / "entry_points.txt").write_text("[fnf.rewards]\nGone = no_such_module:Gone\n")
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "/dev/null"])
    assert str(exit_info.value.code).startswith("fnf: error: fnf.rewards entry point Gone = no_such_module:Gone "
                                                "(fnf-broken): cannot import it (ModuleNotFoundError")
