"""Every bad input a user can give ``fnf fit``: exit code 1, one line on stderr naming the key or file and what is
expected, no traceback, and nothing left behind (no new version folder, no half-written file, no export folder).

Runs in-process (``fnf.cli.main``), so most cases fail in milliseconds; the others load a tiny random model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fnf.cli import main

TESTS = Path(__file__).parent


def _set(key: str, value):
    """An edit that sets a dotted config key (list items by index, as in ``model.rewards.0.weight``)."""
    def edit(config: dict, tmp: Path) -> None:
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def _head(class_path: str, mask: str = "heatmap"):
    return _set("model.rewards", [{"head": {"class_path": class_path}, "mask": mask}])


def _file(key: str, content: str | bytes | None, name: str = "input"):
    """An edit that points ``key`` at a file holding ``content`` (None: a path that does not exist)."""
    def edit(config: dict, tmp: Path) -> None:
        path = tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        _set(key, str(path))(config, tmp)
    return edit


def _under_a_file(key: str):
    """A folder below a regular file: unwritable even for root (who ignores permission bits)."""
    def edit(config: dict, tmp: Path) -> None:
        (tmp / "a-file").write_text("not a folder")
        _set(key, str(tmp / "a-file" / "out"))(config, tmp)
    return edit


def _folder_of_notes(key: str):
    """A user's folder (notes.txt in it) as an output folder fnf replaces whole."""
    def edit(config: dict, tmp: Path) -> None:
        (tmp / "docs").mkdir()
        (tmp / "docs" / "notes.txt").write_text("precious\n")
        _set(key, str(tmp / "docs"))(config, tmp)
    return edit


def _checkpoint(write):
    """An edit that resumes from a file ``write`` makes."""
    def edit(config: dict, tmp: Path) -> None:
        path = tmp / "given.ckpt"
        write(path)
        config["_extra"] = ["--ckpt_path", str(path)]
    return edit


def _torch_save(obj):
    return lambda path: torch.save(obj, path)


class NotATensor:
    pass


NAN, INF = math.nan, math.inf
CASES = {  # name: (edit, extra command-line arguments, expected part of the one line)
    # the parser: keys, types, class paths
    "unknown key in the config": (_set("model.lamda", 0.1), [], "model.lamda: unknown key; did you mean model.lam?"),
    "unknown flag": (None, ["--model.lamda", "1"], "--model.lamda: unknown key; did you mean --model.lam?"),
    "Lightning's own optimizer flag": (None, ["--optimizer", "torch.optim.SGD"],  # it would replace model.optimizer
                                       "--optimizer: unknown key"),
    "abbreviated flag": (None, ["--trainer.max_step", "1"], "--trainer.max_step: unknown key; did you mean "
                                                           "--trainer.max_steps"),  # argparse took prefixes
    "unknown section": (_set("modle", {"lam": 1}), [], "modle.lam: unknown key; did you mean model.lam?"),
    "unknown trainer key": (_set("trainer.max_step", 3), [], "trainer.max_step: unknown key; did you mean "
                                                             "trainer.max_steps"),
    "wrong type": (_set("model.lam", "abc"), [], "model.lam: Expected a <class 'float'>. Got value: abc"),
    "wrong type on the command line": (None, ["--trainer.max_steps", "ten"], "trainer.max_steps: Expected a <class "
                                                                               "'int'>"),
    "value outside a choice": (_set("model.sampler.grad_mode", "bogus"), [], "model.sampler.grad_mode:"),
    "wrong type of an optional value": (None, ["--checkpoint.every_n_train_steps", "abc"],  # not "Given value: abc"
                                        "checkpoint.every_n_train_steps: Expected int or null. Got value: abc"),
    "wrong type inside a class's arguments": (_set("data.filter", {"scan": "scan.jsonl", "head": "ShapesArtifact",
                                                                   "mask_area_above": "big"}), [],
                                              "data.filter.mask_area_above: Expected float or null. Got value: big"),
    "value outside a union of choices": (None, ["--trainer.precision", "32x"], "trainer.precision: Expected int, one "
                                         "of ['transformer-engine', "),
    "a regularizer whose module is not importable": (None, ["--model.regularizer", "my_plugin.regs.PixelL1"],
                                                     "model.regularizer: No module named 'my_plugin'"),
    "a bare YAML off": (_set("model.sampler.checkpointing", False), [],  # what `checkpointing: off` parses to
                        'Got value: False (YAML reads a bare off as false: quote it, "off")'),
    **({} if torch.cuda.is_available() else {  # Lightning's own line: "No supported gpu backend found!"
        "a GPU accelerator without CUDA": (None, ["--trainer.accelerator", "gpu"], "trainer.accelerator=gpu: no CUDA "
                                           "device here (torch.cuda.is_available() is False); use cpu or auto")}),
    "no step to train": (None, ["--trainer.max_steps", "0"], "trainer.max_steps must be >= 1 (or -1: no limit), got 0"),
    "checkpoints every -5 steps": (None, ["--checkpoint.every_n_train_steps", "-5"],  # Lightning's line, its key
                                   "checkpoint: Invalid value for every_n_train_steps=-5. Must be >= 0"),
    "image grids every 0 steps": (None, ["--image_logger.every_n_steps", "0"],  # a modulo by zero at the first step
                                  "image_logger.every_n_steps must be >= 1, got 0"),
    "unknown reward class": (_head("NoSuchHead"), [], "model.rewards.head: unknown class NoSuchHead; `fnf rewards` "
                                                      "lists the heads usable by name"),
    "misspelled reward class": (_head("ShapesArtefact"), [], "model.rewards.head: unknown class ShapesArtefact; "
                                                              "did you mean ShapesArtifact"),
    "misspelled optimizer argument": (_set("model.optimizer", {"class_path": "torch.optim.AdamW",
                                                               "init_args": {"lrr": 0.1}}), [],
                                      "model.optimizer: torch.optim.AdamW has no argument 'lrr'; did you mean lr?"),
    "unknown regularizer class": (_set("model.regularizer", {"class_path": "Zzzq"}), [],
                                  "model.regularizer: unknown class Zzzq; a class of your own: its full "
                                  "class_path"),
    "misspelled class asked for help": (None, ["--model.regularizer.help", "LatentFrobenus"],
                                        "--model.regularizer.help: unknown class LatentFrobenus; did you mean "
                                        "LatentFrobenius"),
    "list item by index": (None, ["--model.rewards.0.weight", "2"], "--model.rewards.0.weight: "
                           "list items cannot be set by index on the command line; set the list in the config"),
    "regularizer of another kind": (None, ["--model.regularizer", "torch.nn.MSELoss"],
                                    "model.regularizer: torch.nn.MSELoss is not a Regularizer subclass"),
    "misspelled callback class path": (None, ["--trainer.callbacks+=fnf.evaluation.Evalution"],
                                       "trainer.callbacks: fnf.evaluation has no class Evalution; did you mean "
                                       "fnf.evaluation.Evaluation?"),
    "unknown precision": (_set("trainer.precision", "17"), [], "trainer.precision:"),
    "no devices": (None, ["--trainer.devices", "0"], "`Trainer(devices='0')` value is not a valid input"),
    "half-precision LoRA": (_set("trainer.precision", "bf16-true"), [], "trainer.precision=bf16-true: LoRA weights, "
                            "their gradients and optimizer state stay float32 in fnf; use bf16-mixed"),
    "frozen dtype without its precision": (_set("model.compute.frozen_dtype", "bfloat16"), [],
                                           "model.compute.frozen_dtype=bfloat16 needs trainer.precision bf16-mixed"),
    # the objective
    "lam nan": (_set("model.lam", NAN), [], "model.lam must be a finite number >= 0, got nan"),
    "lam inf": (_set("model.lam", INF), [], "model.lam must be a finite number >= 0, got inf"),
    "lam negative": (_set("model.lam", -0.5), [], "model.lam must be a finite number >= 0, got -0.5"),
    "reward weight nan": (_set("model.rewards.0.weight", NAN), [], "model.rewards[0].weight must be a finite number"),
    "reward weight inf": (_set("model.rewards.0.weight", -INF), [], "model.rewards[0].weight must be a finite"),
    "reward weight negative": (_set("model.rewards.0.weight", -1.0), [],
                               "model.rewards[0].weight must be a finite number >= 0"),
    "per-head lam under union": (_set("model.rewards.0.lam", 0.5), [], "model.rewards[0].lam is only used with "
                                                                       "model.mask_mode=per_head"),
    "per-head lam nan": (_set("model.rewards.0.lam", NAN), ["--model.mask_mode", "per_head"],
                         "model.rewards[0].lam must be a finite number >= 0 or null, got nan"),
    "clean_score nan": (_set("model.rewards.0.clean_score", NAN), [], "model.rewards[0].clean_score must be a finite number or null, got nan"),
    "clean_score without saliency": (_set("model.rewards.0.clean_score", 0.5), [],
                                     "model.rewards[0].clean_score is only read with mask: saliency"),
    "per-head lam on a maskless head": (_set("model.rewards", [
        {"head": {"class_path": "ColorRegion"}, "mask": "heatmap"},
        {"head": {"class_path": "ColorRegion"}, "mask": "none", "lam": 2.0, "name": "plain"}]),
        ["--model.mask_mode", "per_head"], "model.rewards[1].lam weighs the fidelity term outside this head's mask"),
    "no reward": (_set("model.rewards", []), [], "model.rewards: at least one reward term is required"),
    "per_head without masks": (_head("ColorRegion", mask="none"), ["--model.mask_mode", "per_head"],
                               "model.mask_mode=per_head needs at least one reward with mask"),
    # the sampler and the LoRA
    "resolution negative": (_set("model.sampler.resolution", -8), [], "model.sampler.resolution must be a positive"),
    "resolution zero": (_set("model.sampler.resolution", 0), [], "model.sampler.resolution must be a positive"),
    "resolution off the VAE grid": (_set("model.sampler.resolution", 15), [], "model.sampler.resolution=15 must be "
                                                                              "divisible by the VAE factor 2"),
    "no sampling steps": (_set("model.sampler.num_steps", 0), [], "model.sampler.num_steps must be >= 1"),
    "k beyond the steps": (_set("model.sampler.k", 9), [], "model.sampler.k must be in [1, num_steps=3], got 9"),
    "guidance below 1": (_set("model.sampler.guidance_scale", 0.5), [], "model.sampler.guidance_scale must be"),
    "guidance inf": (_set("model.sampler.guidance_scale", INF), [], "model.sampler.guidance_scale must be a finite"),
    "LoRA rank 0": (_set("model.lora.rank", 0), [], "model.lora.rank must be >= 1, got 0"),
    "LoRA alpha 0": (_set("model.lora.alpha", 0.0), [], "model.lora.alpha must be > 0 (or null: the rank), got 0.0"),
    "LoRA target that matches nothing": (_set("model.lora.target_modules", ["to_q", "to_kk"]), [],
                                         "model.lora.target_modules: to_kk match no module of the "
                                         "UNet2DConditionModel; its Linear layers include "),
    "LoRA target that is only part of a name": (_set("model.lora.target_modules", ["to_q", "to_"]), [],  # peft
                                                "model.lora.target_modules: to_ match no module of the "  # too
                                                "UNet2DConditionModel; its Linear layers include linear_1, linear_2, "
                                                "net.2, proj, time_emb_proj, to_k, to_out.0, to_q, to_v"),
    "CUDA graphs on a CPU": (_set("model.compute.compile", "unet+graphs"), [],
                             "model.compute.compile=unet+graphs needs a CUDA device"),
    "pretrained model missing": (_set("model.pretrained", "/no/such/model"), [], "model.pretrained:"),
    "pretrained path that does not exist": (_file("model.pretrained", None, "no-model"), [],
                                            "no-model: no such folder"),
    "pretrained folder without model_index.json": (_folder_of_notes("model.pretrained"), [],
                                                   "docs has no model_index.json; expected a diffusers model folder"),
    "pretrained model is a file": (_file("model.pretrained", b"\0" * 64, "model.safetensors"), [],
                                   "model.safetensors is a file; expected a diffusers model folder"),
    # reward heads that break the contract
    "head raises in __init__": (_head("bad_heads.RaisesInInit"), [],
                                "bad_heads.RaisesInInit: RuntimeError: driver exploded (set FNF_DEBUG=1"),
    "head weights that do not exist": (_set("model.rewards", [{"head": {"class_path": "OpenCLIPAlignment", "init_args": {
        "model": "ViT-B-32", "pretrained": "/no/such.safetensors"}}, "mask": "none"}]), [],
        "error: OpenCLIPAlignment.pretrained: /no/such.safetensors: no such file"),  # named once, not twice
    "head returns a tensor": (_head("bad_heads.ReturnsATensor"), [],
                              "reward head ReturnsATensor: forward must return RewardOutput, got Tensor"),
    "heatmap mask without a heatmap": (_head("bad_heads.ScoreOnly"), [], "reward head ScoreOnly returns no heatmap"),
    "head without a gradient": (_head("bad_heads.Detached", mask="none"), [],
                                "reward head Detached: score has no gradient with respect to the images"),
    # the optimizer
    "lr nan": (_set("model.optimizer", {"class_path": "torch.optim.AdamW", "init_args": {"lr": NAN}}), [],
               "model.optimizer.init_args: Invalid learning rate: nan"),
    "lr inf": (_set("model.optimizer", {"class_path": "torch.optim.AdamW", "init_args": {"lr": INF}}), [],
               "model.optimizer.init_args.lr must be a finite number >= 0, got inf"),
    "lr negative": (_set("model.optimizer", {"class_path": "torch.optim.AdamW", "init_args": {"lr": -1.0}}), [],
                    "model.optimizer.init_args: Invalid learning rate: -1.0"),
    # data
    "prompt file missing": (_file("data.train_file", None, "missing.txt"), [], "missing.txt"),
    "prompt file empty": (_file("data.train_file", "", "empty.txt"), [], "empty.txt"),
    "prompt file with a broken JSON line": (_file("data.train_file", '{"prompt": "a"}\n{"prompt": \n', "p.jsonl"), [],
                                            "p.jsonl"),
    "batch size 0": (_set("data.batch_size", 0), [], "data.batch_size must be >= 1, got 0"),
    # output folders, checked before the first step
    "unwritable LoRA export folder": (_under_a_file("lora_export.dirpath"), [], "lora_export.dirpath: cannot write to"),
    "unwritable log folder": (_under_a_file("trainer.default_root_dir"), [], "trainer.default_root_dir"),
    "unwritable checkpoint folder": (_under_a_file("checkpoint.dirpath"), [], "checkpoint.dirpath: cannot write to"),
    "LoRA export folder is a file": (_file("lora_export.dirpath", "notes\n", "notes.txt"), [],
                                     "notes.txt is a file; expected a folder to write into"),
    "LoRA export folder is the run's": (_file("lora_export.dirpath", None, "run"), [],
                                        "run holds trainer.default_root_dir"),
    "LoRA export folder holds other files": (_folder_of_notes("lora_export.dirpath"), [],
                                             "docs holds notes.txt and was not written by fnf's LoRA export"),
    # checkpoints
    "checkpoint missing": (None, ["--ckpt_path", "/no/such.ckpt"], "ckpt_path: checkpoint /no/such.ckpt not found"),
    "checkpoint is random bytes": (_checkpoint(lambda p: p.write_bytes(os.urandom(4096))), [],
                                   "as a checkpoint: truncated or not a torch checkpoint"),
    "checkpoint truncated": (_checkpoint(lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 64)), [],
                             "as a checkpoint: truncated or not a torch checkpoint"),
    "checkpoint is a folder": (None, ["--ckpt_path", "/"], "ckpt_path: / is a folder"),
    "checkpoint pickles objects": (_checkpoint(_torch_save({"state_dict": {}, "x": NotATensor()})), [],
                                   "holds objects other than tensors and plain types"),
    "checkpoint is a bare tensor": (_checkpoint(_torch_save(torch.zeros(2))), [], "not a Lightning checkpoint"),
    "resume without any checkpoint": (None, ["--ckpt_path", "last"], "--ckpt_path last: no last.ckpt under"),
}


def _base_config(model: str, tmp: Path) -> dict:
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red circle top left\na blue square bottom right\n")
    return {"model": {"pretrained": model, "lam": 0.1, "sampler": {"num_steps": 3, "k": 1}, "lora": {"rank": 4},
                      "rewards": [{"head": {"class_path": "ColorRegion"}, "mask": "heatmap"}]},
            "data": {"train_file": str(prompts), "batch_size": 2},
            "trainer": {"max_steps": 2, "default_root_dir": str(tmp / "run"), "enable_progress_bar": False,
                        "enable_model_summary": False, "logger": True}}


def _fail(config: dict, tmp: Path, extra: list[str], capsys) -> str:
    """Run ``fnf fit``; expect exit code 1 with one line and no traceback; return the line."""
    extra = [*config.pop("_extra", []), *extra]
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), *extra])
    message = str(exit_info.value.code)
    assert message.startswith("fnf: error: ") and "\n" not in message, message  # sys.exit(str): exit code 1
    assert "Traceback" not in capsys.readouterr().err
    return message


def _leftovers(tmp: Path, before: set[Path] | None = None) -> list[str]:
    """What a failed run may not leave: its root folder (trainer.default_root_dir: it did not exist), version
    folders, staging files and folders, exported LoRA folders; given the files there ``before`` the run, anything
    new but the config it was given."""
    if before is not None:
        return sorted(str(p.relative_to(tmp)) for p in set(tmp.rglob("*")) - before if p.name != "config.yaml")
    return sorted(str(p.relative_to(tmp)) for pattern in ("run", "**/*.tmp", "**/.*", "**/lora", "**/out")
                  for p in tmp.glob(pattern))


@pytest.fixture(autouse=True)
def _heads_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # bad_heads.* by class_path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(name, tiny_model_dir, tmp_path, capsys):
    edit, extra, expected = CASES[name]
    config = _base_config(tiny_model_dir, tmp_path)
    if edit is not None:
        edit(config, tmp_path)
    before = set(tmp_path.rglob("*"))
    message = _fail(config, tmp_path, extra, capsys)
    assert expected in message and ("FNF_DEBUG" in expected) == ("FNF_DEBUG" in message), message  # not a crash
    assert _leftovers(tmp_path, before) == []


def test_the_matrix_covers_the_cases_the_docs_count():
    docs = (Path(__file__).parents[1] / "docs" / "scale-and-reliability.md").read_text()
    on_cpu, with_cuda = map(int, re.search(r"runs (\d+) cases \((\d+) with CUDA\)", docs).groups())
    assert len(CASES) == (with_cuda if torch.cuda.is_available() else on_cpu)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A finished 2-step run (rank-4 LoRA, lam 0.1) to resume with contradicting settings."""
    tmp = tmp_path_factory.mktemp("trained")
    config = _base_config(tiny_model_dir, tmp)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(tmp / "config.yaml")])
    return tmp, config


@pytest.mark.parametrize("extra, expected", [
    (["--model.lora.rank", "16"], "model.lora.rank: 16 in the config but 4 in "),
    (["--model.lora.target_modules", "[to_q]"], "model.lora.target_modules: ['to_q'] in the config but"),
    (["--model.lora.target_modules", "[to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out]"],
     "model.lora.target_modules: the config adds ['ff.net.0.proj', 'ff.net.2', 'proj_in', 'proj_out'] and lacks [] "
     "against "),  # long lists: the difference, not both cut to a line
    (["--model.lam", "0.5"], "model.lam: 0.5 in the config but 0.1 in "),
    (["--model.sampler.num_steps", "4"], "model.sampler.num_steps: 4 in the config but 3 in "),
    # the rest of the recipe: the optimizer's state would keep the old lr, another reward is another objective,
    # and another batch size or device count would restart the epoch at another item
    (["--model.optimizer.init_args.lr", "0.5"], "model.optimizer.init_args.lr: 0.5 in the config but 0.001 in "),
    (["--model.rewards", "[{head: {class_path: ColorRegion, init_args: {box: [0.5, 0.5, 1, 1]}}}]"],
     "model.rewards.0.head.init_args.box: [0.5, 0.5, 1.0, 1.0] in the config but [0.0, 0.0, 0.5, 0.5] in "),
    (["--model.regularizer", "LatentFrobenius"], "model.regularizer: {'class_path': 'fnf.regularizers.LatentFrobenius'"
                                                 "} in the config but None in "),
    (["--data.batch_size", "1"], "data.batch_size: 1 in the config but 2 in "),
    (["--data.seeds_per_prompt", "2"], "data.seeds_per_prompt: 2 in the config but 1 in "),
    (["--data.val_fraction", "0.5"], "data.val_fraction: 0.5 in the config but 0.0 in "),
    (["--trainer.accumulate_grad_batches", "2"], "trainer.accumulate_grad_batches: 2 in the config but 1 in "),
    (["--trainer.gradient_clip_val", "0.5"], "trainer.gradient_clip_val: 0.5 in the config but None in "),
])
def test_resuming_with_settings_that_contradict_the_checkpoint_is_refused(trained, extra, expected, capsys):
    """Lightning would silently replace the config's model settings by the checkpoint's; fnf refuses instead."""
    tmp, config = trained
    config = copy.deepcopy(config)
    config["trainer"]["max_steps"] = 4
    folders = sorted((tmp / "run" / "lightning_logs").iterdir())
    message = _fail(config, tmp, ["--ckpt_path", "last", *extra], capsys)
    assert expected in message and "last.ckpt" in message, message
    assert sorted((tmp / "run" / "lightning_logs").iterdir()) == folders


def test_resuming_after_the_prompt_file_was_edited_is_refused(trained, capsys):
    """The same path with other prompts is another run: the checkpoint's place in its epoch order would not fit."""
    tmp, config = trained
    config = copy.deepcopy(config)
    config["trainer"]["max_steps"] = 4
    prompts = Path(config["data"]["train_file"])
    original, folders = prompts.read_text(), sorted((tmp / "run" / "lightning_logs").iterdir())
    try:
        prompts.write_text(original + "a green square\n")
        message = _fail(config, tmp, ["--ckpt_path", "last"], capsys)
    finally:
        prompts.write_text(original)
    assert f"data.train_file: {prompts} holds other prompts than the run of " in message, message
    assert message.endswith("restore the file or start a new run (leave out --ckpt_path)"), message
    assert sorted((tmp / "run" / "lightning_logs").iterdir()) == folders


def test_resuming_with_a_moved_base_model_and_other_speed_levers_continues(trained, tmp_path, caplog):
    """model.pretrained (where the base model lives) and model.compute.* (speed levers) may change on resume."""
    tmp, config = trained
    shutil.copytree(tmp / "run", tmp_path / "run")
    moved = shutil.copytree(config["model"]["pretrained"], tmp_path / "moved-model")
    config = copy.deepcopy(config)
    config["model"]["pretrained"] = str(moved)
    config["trainer"] |= {"max_steps": 3, "default_root_dir": str(tmp_path / "run")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", "last",
              "--model.compute.memory_format", "channels_last"])
    assert "model.compute.memory_format='channels_last' (trained with 'contiguous')" in caplog.text
    assert f"model.pretrained='{moved}'" in caplog.text
    last = max((tmp_path / "run").rglob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    assert torch.load(last, weights_only=True)["global_step"] == 3  # trained on from step 2


def test_evaluating_with_other_sampler_settings_says_so_but_lora_settings_must_match(trained, caplog):
    tmp, config = trained
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump({**config, "data": {**config["data"], "test_file": config["data"]["train_file"]}}))
    with caplog.at_level(logging.INFO):
        main(["test", "--config", str(path), "--ckpt_path", "last", "--model.sampler.num_steps", "2"])
    assert "test with settings that differ from the checkpoint's: model.sampler.num_steps=2 (trained with 3)" in \
        caplog.text
    with pytest.raises(SystemExit, match="model.lora.rank: 8 in the config but 4 in "):
        main(["test", "--config", str(path), "--ckpt_path", "last", "--model.lora.rank", "8"])


def test_a_half_precision_lora_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                  model_loading_fails):
    """(setup refuses it again; the matrix case alone passes even if the early check is gone.)"""
    message = _fail(_base_config(tiny_model_dir, tmp_path), tmp_path, ["--trainer.precision", "bf16-true"], capsys)
    assert "trainer.precision=bf16-true: LoRA weights, their gradients and optimizer state stay float32" in message
