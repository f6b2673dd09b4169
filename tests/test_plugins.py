"""Plugins by entry point: a package installed with pip is listed by ``fnf rewards``, and its head and regularizer
are usable by their short names in YAML (tests/fixtures/fnf_plugin_demo, installed into a temporary folder, not the
venv, which the tests put on sys.path)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fnf.cli import main
from fnf.rewards import RewardHead

PLUGIN = Path(__file__).parent / "fixtures" / "fnf_plugin_demo"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(target), str(PLUGIN)], check=True, capture_output=True)
    assert (target / "fnf_plugin_demo").is_dir() and list(target.glob("fnf_plugin_demo-*.dist-info"))
    return target


def _site(tmp_path: Path, package: str, entry_points: str) -> Path:
    """A folder holding an installed distribution's metadata with these entry points (what pip leaves)."""
    site = tmp_path / f"{package}-site"
    info = site / f"{package.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def _fnf(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``fnf`` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_info:
        code, message = (1, str(exit_info.code)) if isinstance(exit_info.code, str) else (exit_info.code or 0, "")
        print(message, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def _rows(listing: str) -> dict[str, str]:
    return {line.split()[0]: line for line in listing.splitlines() if line and not line.startswith(" ")}


def test_installed_heads_are_listed_and_train_by_their_short_name(site, config, tmp_path, monkeypatch, capsys):
    """Before the install (in this process: the plugin never imported yet) the name is unknown; after, it is listed
    by ``fnf rewards`` with its heatmap kind and docs, and a config names it by its class name alone."""
    data = yaml.safe_load(config.read_text())
    data["model"]["rewards"] = [{"head": {"class_path": "DemoBlueness"}, "mask": "heatmap"}]
    data["model"]["regularizer"] = {"class_path": "DemoPixelL1"}  # the plugin's fnf.regularizers entry point
    data["trainer"]["max_steps"] = 1
    config.write_text(yaml.safe_dump(data))
    code, out, err = _fnf(capsys, "rewards")
    assert code == 0 and "DemoBlueness" not in out and _rows(out)["ShapesSafety"].split()[1] == "optional"
    assert _rows(out)["ShapesAlignment"].split()[1] == "no" and "[plugin]" not in _rows(out)["ColorRegion"]
    code, _, err = _fnf(capsys, "fit", "--config", str(config))
    assert code == 1 and "unknown class Demo" in err.strip().splitlines()[-1]

    monkeypatch.syspath_prepend(str(site))  # what pip install does: the package and its dist-info on sys.path
    code, out, _ = _fnf(capsys, "rewards")
    assert code == 0 and _rows(out)["DemoBlueness"].split()[1] == "yes"
    assert _rows(out)["DemoBlueness"].endswith("fnf_plugin_demo.DemoBlueness [plugin]")
    assert "Rewards blue images" in out
    code, _, err = _fnf(capsys, "fit", "--config", str(config))
    assert code == 0, err[-2000:]
    saved = next((tmp_path / "run").rglob("config.yaml")).read_text()
    assert "fnf_plugin_demo.DemoBlueness" in saved and "fnf_plugin_demo.DemoPixelL1" in saved


def test_a_backbone_plugin_loads_the_folders_of_its_pipeline_class(site, config, tiny_model_dir, tmp_path,
                                                                    monkeypatch, capsys):
    """Folders whose model_index.json names the plugin's pipeline class load as its family, wherever fnf loads a model
    (fit, export); without the plugin such a folder loads by its layout, with a warning saying so."""
    from fnf.pipeline import Text2ImageModel

    folder = tmp_path / "demo-model"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "DemoPipeline"}))
    with pytest.warns(UserWarning, match="is a DemoPipeline folder and no installed fnf.backbones entry point names "
                                         "DemoPipeline: loaded by its layout"):  # an export without the plugin
        assert type(Text2ImageModel.from_pretrained(folder)) is Text2ImageModel
    monkeypatch.syspath_prepend(str(site))
    model = Text2ImageModel.from_pretrained(folder)
    assert type(model).__name__ == "DemoBackbone"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = Text2ImageModel.from_pretrained(tiny_model_dir)  # a built-in pipeline class: no warning
    assert not [w for w in caught if "no installed fnf.backbones entry point" in str(w.message)]
    assert not torch.equal(model.encode_prompts(["a red circle"]).hidden, plain.encode_prompts(["a red circle"]).hidden)
    code, _, err = _fnf(capsys, "fit", "--config", str(config), f"--model.pretrained={folder}",
                        "--trainer.max_steps=1")
    assert code == 0, err[-2000:]
    code, _, err = _fnf(capsys, "export", "--ckpt_path", str(next((tmp_path / "run").rglob("last.ckpt"))),
                        "--format", "diffusers", "--out", str(tmp_path / "exported"))
    assert code == 0 and (tmp_path / "exported").is_dir(), err[-2000:]


def test_a_backbone_plugin_may_not_take_a_built_in_pipeline_class(tiny_model_dir, tmp_path, monkeypatch):
    from fnf.pipeline import Text2ImageModel

    monkeypatch.syspath_prepend(str(_site(tmp_path, "fnf-clash", "[fnf.backbones]\n"
                                                                 "StableDiffusionPipeline = fnf.pipeline:Text2ImageModel\n")))
    with pytest.raises(ValueError, match="fnf loads StableDiffusionPipeline folders itself; a plugin family needs a "
                                         "pipeline class of its own"):
        Text2ImageModel.from_pretrained(tiny_model_dir)


def test_a_plugin_that_cannot_be_imported_warns_and_is_named_where_it_is_used(site, tmp_path, monkeypatch, capsys):
    """An unrelated broken plugin must not stop every run: a warning; a config naming its head is one line."""
    monkeypatch.syspath_prepend(str(_site(tmp_path, "fnf-broken", "[fnf.rewards]\nGone = no_such_module:Gone\n")))
    monkeypatch.setattr("fnf.plugins.UNIMPORTABLE", {})
    code, out, err = _fnf(capsys, "rewards")
    assert code == 0 and "ShapesArtifact" in out
    assert err.startswith("fnf: warning: fnf.rewards entry point Gone = no_such_module:Gone (fnf-broken): cannot "
                          "import it (ModuleNotFoundError"), err
    monkeypatch.setenv("RANK", "1")  # the other processes of a run: the warning is said once, by rank 0
    assert _fnf(capsys, "rewards")[2] == ""
    monkeypatch.delenv("RANK")
    config = tmp_path / "gone.yaml"
    config.write_text(yaml.safe_dump({"model": {"rewards": [{"head": {"class_path": "Gone"}}]}}))
    code, _, err = _fnf(capsys, "fit", "--config", str(config))
    assert err.strip().splitlines()[-1].startswith(
        "fnf: error: model.rewards.head: unknown class Gone; its plugin is installed but fnf.rewards entry point Gone "
        "= no_such_module:Gone (fnf-broken): cannot import it"), err


@pytest.mark.parametrize("group, entry, message", [
    ("fnf.rewards", "Bright = clash:Other", "fnf.rewards entry point Bright = clash:Other (fnf-broken): the entry "
                                           "point's name must be its class's, Other"),
    ("fnf.rewards", "ShapesArtifact = clash:ShapesArtifact", "a built-in head is called ShapesArtifact; rename the "
                                                             "class"),
    ("fnf.regularizers", "Other = clash:Other", "fnf.regularizers entry point Other = clash:Other (fnf-broken): "
                                                "expected a Regularizer subclass, got <class 'clash.Other'>"),
    ("fnf.regularizers", "PixelFrobenius = clash:PixelFrobenius", "a built-in regularizer is called PixelFrobenius; "
                                                                  "rename the class"),
])
def test_an_entry_point_yaml_could_not_name_is_refused(tmp_path, monkeypatch, group, entry, message):
    """YAML names a head or regularizer by its class: an entry point under another name, of another kind, or a
    second ShapesArtifact, would make its short name fail or pick one of two classes."""
    broken = _site(tmp_path, "fnf-broken", f"[{group}]\n{entry}\n")
    (broken / "clash.py").write_text("from fnf.regularizers import Regularizer\nfrom fnf.rewards import RewardHead\n\n\n"
                                     "class Other(RewardHead):\n    pass\n\n\nclass ShapesArtifact(RewardHead):\n"
                                     "    pass\n\n\nclass PixelFrobenius(Regularizer):\n    pass\n")
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "/dev/null"])
    assert message in str(exit_info.value.code)


def test_fnf_rewards_shows_a_heads_first_sentence_and_has_help(capsys):
    from fnf.plugins import describe, main
    from fnf.rewards import RewardHead

    class _Wrapped(RewardHead):
        """A first sentence wrapped
        onto a second line. A second sentence."""

    assert describe(_Wrapped, "imported").endswith("\n    A first sentence wrapped onto a second line.")
    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: fnf rewards")


def test_an_entry_point_may_name_a_built_in_head_itself(tmp_path, monkeypatch):
    """A package re-exporting fnf's own class under its own name is no clash (the same class either way)."""
    from fnf.plugins import load_plugins
    from fnf.rewards import ShapesArtifact

    monkeypatch.syspath_prepend(str(_site(tmp_path, "fnf-same", "[fnf.rewards]\n"
                                                                "ShapesArtifact = fnf.rewards:ShapesArtifact\n")))
    assert load_plugins()["ShapesArtifact"] is ShapesArtifact


class _PrivateHead(RewardHead):
    def forward(self, images, prompts):
        raise AssertionError("never called")


class ImportedHead(_PrivateHead):
    """A head imported by a test module, neither built in nor a plugin."""


def test_fnf_rewards_lists_built_ins_first_and_no_private_heads(capsys):
    code, out, _ = _fnf(capsys, "rewards")
    rows = [_rows(out)[name] for name in list(_rows(out))[1:]]  # after the header
    built_in = [not row.endswith("]") for row in rows]  # others end in [plugin] / [imported]
    assert code == 0 and "_PrivateHead" not in out and _rows(out)["ImportedHead"].endswith("[imported]")
    assert built_in == sorted(built_in, reverse=True) and sum(built_in) >= 9  # every built-in head first


def test_a_broken_plugin_warns_once_per_machine_too(tmp_path, monkeypatch, capsys):
    """torchrun sets LOCAL_RANK before (or without) RANK: only local rank 0 says the warning."""
    from fnf.plugins import load_plugins

    monkeypatch.syspath_prepend(str(_site(tmp_path, "fnf-broken", "[fnf.rewards]\nGone = no_such_module:Gone\n")))
    monkeypatch.setattr("fnf.plugins.UNIMPORTABLE", {})
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    load_plugins()
    assert "fnf: warning: fnf.rewards entry point Gone" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")
    load_plugins()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("target, message", [
    ("no_such_module:X", "model.pretrained: {folder} is a BrokenPipeline folder, but its fnf.backbones entry point "
                         "BrokenPipeline = no_such_module:X (fnf-broken) cannot be imported (ModuleNotFoundError: No "
                         "module named 'no_such_module')"),
    ("fnf.rewards:ColorRegion", "model.pretrained: fnf.backbones entry point BrokenPipeline = fnf.rewards:ColorRegion "
                                "(fnf-broken): expected a Text2ImageModel subclass, got <class "
                                "'fnf.rewards.color_region.ColorRegion'>"),
], ids=["unimportable", "not-a-family"])
def test_a_broken_backbone_plugin_is_one_line(tmp_path, monkeypatch, target, message):
    """Only a folder of the plugin's pipeline class needs the plugin: loading it says what is wrong with the entry
    point, not an import traceback or an AttributeError from deep inside loading."""
    from fnf.pipeline import Text2ImageModel

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "BrokenPipeline"}))
    monkeypatch.syspath_prepend(str(_site(tmp_path, "fnf-broken", f"[fnf.backbones]\nBrokenPipeline = {target}\n")))
    with pytest.raises(ValueError) as error:
        Text2ImageModel.from_pretrained(folder)
    assert str(error.value) == message.format(folder=folder)
