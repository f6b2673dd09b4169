"""The ``fnf`` CLI: fit/validate/predict run on a tiny model; bad input fails with one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from fnf.cli import COMMAND_HELP, main


def _fail(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    return capsys.readouterr().err + str(exit_info.value.code)


def test_fit_then_predict_writes_lora_and_pngs(config, tmp_path, recwarn, caplog):
    main(["fit", "--config", str(config)])
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    assert (version / "lora" / "pytorch_lora_weights.safetensors").is_file()
    checkpoint = next((version / "checkpoints").glob("*.ckpt"))
    main(["predict", "--config", str(config), "--ckpt_path", str(checkpoint)])
    tuned = sorted((tmp_path / "predictions" / "tuned").glob("*.png"))
    assert len(tuned) == 4 and len(list((tmp_path / "predictions" / "base").glob("*.png"))) == 4
    assert len((tmp_path / "predictions" / "prompts.tsv").read_text().splitlines()) == 1 + 4  # header + images
    main(["test", "--config", str(config), "--ckpt_path", "last", "--data.test_file", str(tmp_path / "prompts.txt")])
    noise = ("The dirpath has changed", "callbacks used to create the checkpoint need to be provided")
    assert not [w for w in recwarn if any(line in str(w.message) for line in noise)]  # not this run's checkpointing
    assert "Tip:" not in caplog.text and "Restoring states" in caplog.text  # Lightning's own lines, but no advert
    assert f"fnf: run folder {version}; LoRA (diffusers load_lora_weights) in {version / 'lora'}" in caplog.text


@pytest.mark.parametrize("command", ["fit", "test"])
def test_a_folder_as_ckpt_path_is_refused_before_the_model_loads(command, config, tmp_path, model_loading_fails,
                                                                 capsys):
    """Only a distributed checkpoint is a folder; any other got as far as Lightning's "Restoring states" first."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    message = _fail([command, "--config", str(config), "--ckpt_path", str(folder)], capsys)
    assert message.endswith(f"fnf: error: ckpt_path: {folder} is a folder; expected a .ckpt file"), message


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    for phrase in ("--model.lam", "0 gives plain DRaFT", "--model.sampler.k", "number of final steps that carry gradients", "--model.masks.empty", "--data.train_file"):
        assert phrase in text, phrase


def test_help_lists_every_command_and_a_typo_gets_the_closest(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{tool}:" in text for tool in ("report", "export", "preview", "scan", "rewards", "rahf-train"))
    assert f"test {COMMAND_HELP['test']}" in text and f"fit {COMMAND_HELP['fit']}" in text  # not Lightning's cut lines
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert COMMAND_HELP["predict"] in " ".join(capsys.readouterr().out.split())
    for argv, expected in ((["reprot", "runs/x"], "fnf: error: reprot: unknown command; did you mean report"),
                           ([], "fnf: error: no command; expected one of fit, validate, test, predict, report")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert str(exit_info.value.code).startswith(expected) and "\n" not in str(exit_info.value.code)


def test_unknown_key_is_one_clear_error(config, capsys):
    assert "--model.bogus" in _fail(["fit", "--config", str(config), "--model.bogus", "1"], capsys)


@pytest.mark.parametrize("args, expected", [
    (["--model.lamda", "1"], "--model.lamda: unknown key; did you mean --model.lam?"),
    (["--model.lam", "abc"], "model.lam: Expected a <class 'float'>. Got value: abc"),
    (["--model.sampler.grad_mode", "bogus"], "model.sampler.grad_mode: Expected a typing.Literal"),
])
def test_parser_errors_are_one_line_without_the_usage(config, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *args])
    message = str(exit_info.value.code)
    assert message.startswith(f"fnf: error: {expected}") and "\n" not in message, message
    assert "usage:" not in capsys.readouterr().err  # no usage text


@pytest.mark.parametrize("args, expected", [
    (["--model.optimizer.init_args.lrr", "1"], "model.optimizer: torch.optim.AdamW has no argument 'lrr'; did you mean lr?"),
    (["--trainer.logger", "CSVLogger", "--trainer.logger.init_args.save_dirr", "x"],
     "trainer.logger: lightning.pytorch.loggers.CSVLogger has no argument 'save_dirr'; did you mean save_dir?"),
    (["--trainer.callbacks+", "fnf.evaluation.Evaluation", "--trainer.callbacks.judgez", "[]"],
     "fnf.evaluation.Evaluation has no argument 'judgez'; did you mean judges?"),
])
def test_a_mistyped_argument_of_a_class_is_named_with_the_closest(config, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *args])
    message = str(exit_info.value.code)
    assert expected in message and "\n" not in message, message


def test_evaluating_without_a_checkpoint_says_the_lora_is_untrained(config, caplog):
    with caplog.at_level("INFO"):
        main(["test", "--config", str(config), "--data.test_file", yaml.safe_load(config.read_text())["data"]["train_file"],
              "--trainer.limit_test_batches", "1"])
    assert "test without --ckpt_path: the LoRA as initialised, so tuned = base" in caplog.text


@pytest.mark.parametrize("text, expected", [("", "got an empty file"), ("- model\n", "got list"),
                                            ("model:\n  lamda: 1\n", "model.lamda: unknown key; did you mean model.lam?")])
def test_bad_config_files_are_one_line(tmp_path, text, expected):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "bad.yaml")])
    assert expected in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


def test_unknown_reward_class_is_named(config, capsys):
    text = config.read_text().replace("ColorRegion", "NoSuchReward")
    config.write_text(text)
    assert "NoSuchReward" in _fail(["fit", "--config", str(config)], capsys)


def test_missing_prompt_file_is_named(config, capsys, tmp_path):
    message = _fail(["fit", "--config", str(config), "--data.train_file", "/no/such/prompts.txt"], capsys)
    assert "/no/such/prompts.txt" in message and "not found" in message
    assert not (tmp_path / "run" / "lightning_logs").exists()  # the failed run left no folders behind
    message = _fail(["test", "--config", str(config), "--data.test_file", "/no/such/test.txt"], capsys)
    assert "/no/such/test.txt" in message and not (tmp_path / "run" / "lightning_logs").exists()
    for command, key in (("test", "test_file"), ("validate", "val_file")):  # nothing to evaluate is an error
        message = _fail([command, "--config", str(config), f"--data.{key}", "null"], capsys)
        assert message.endswith(f"fnf: error: no prompts for {command.replace('validate', 'val')}: set --data.{key}"
                                + (" (or --data.val_fraction with --data.train_file)" if command == "validate"
                                   else "")), message
        assert not (tmp_path / "run" / "lightning_logs").exists()


def test_invalid_value_names_the_key(config, capsys):
    assert "model.sampler.k" in _fail(["fit", "--config", str(config), "--model.sampler.k", "9"], capsys)


def test_checkpointing_can_be_switched_off(config, tmp_path):
    """The default ``checkpoint:`` callback steps aside for ``--trainer.enable_checkpointing false``."""
    main(["fit", "--config", str(config), "--trainer.enable_checkpointing", "false"])
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    assert list((tmp_path / "run").rglob("pytorch_lora_weights.safetensors"))  # the run itself completed


def test_the_fnf_command_starts_its_tools_without_lightning():
    """``fnf report`` and ``fnf rewards`` answer in a second or three, and a mistyped command or --config file at
    once: importing Lightning takes ~9 s here (torchmetrics, which imports torchvision, transformers and scipy)."""
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fnf"] == "fnf.commands:main"
    code = ("import sys\nfrom fnf.commands import main\n"
            "for argv in (['report', '/no/such/run'], ['nosuch'], ['rewards'], ['fit', '-c', '/no/such.yaml']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exit:\n        print(exit.code)\n"
            "print(sorted({'lightning', 'torchmetrics'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fnf: error: /no/such/run: no such folder" in done and "fnf: error: nosuch: unknown command" in done
    assert "fnf: error: --config /no/such.yaml: No such file or directory" in done
    assert "ShapesArtifact" in done and done.splitlines()[-1] == "[]", done


def test_the_fnf_command_gives_its_tools_the_settings_of_every_command(monkeypatch):
    """``fnf scan --help`` and ``fnf preview --help`` document each option from the classes' docstrings only with
    jsonargparse's docstring setting, which ``fnf.commands.configure`` makes (with the warning filters)."""
    from fnf import commands

    calls = []
    monkeypatch.setattr(commands, "configure", lambda argv: calls.append(("configure", commands.prints_docs(argv))))
    monkeypatch.setattr(commands, "run_tool", lambda argv: calls.append(argv[0]))
    commands.main(["scan", "--help"])
    assert calls == [("configure", True), "scan"]


def test_only_help_pays_for_the_attribute_docstrings():
    """Reading the dataclasses' attribute docstrings parses the source of every class a parser covers (~2 s of each
    command's start, a quarter of a short fit's): only what prints them asks for it."""
    from fnf.commands import prints_docs

    for argv in (["fit", "--help"], ["fit", "-h"], ["scan", "--help"], ["fit", "--model.regularizer.help", "Pixel"],
                 ["fit", "--model.regularizer.help=PixelFrobenius"]):
        assert prints_docs(argv), argv
    for argv in (["fit", "--config", "help.yaml"], ["test", "--ckpt_path", "last"], ["fit", "--model.helper=1"],
                 ["fit", "--print_config"], []):
        assert not prints_docs(argv), argv


def test_the_progress_bar_of_a_run_limited_by_steps_has_no_negative_epoch_total(config, capsys):
    """max_steps sets Lightning's max_epochs to -1, which its rich bar (2.6) printed as "Epoch 1/-2"."""
    main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "true", "--trainer.max_steps", "3"])
    shown = capsys.readouterr().out
    assert "Epoch 1 " in shown and "/-2" not in shown, shown  # 2 batches an epoch: step 3 is in epoch 1
    assert "v_num" not in shown and "train/loss" in shown, shown


@pytest.mark.parametrize("accumulate, steps, last_batch", [(1, (2, 3), 3), (2, (1, 3), 6)])
def test_the_progress_bar_of_a_run_restored_mid_epoch_ends_at_its_last_batch(config, capsys, accumulate, steps,
                                                                              last_batch):
    """8 batches an epoch, restored after 2: the bar counts on from batch 3 and ends at the run's last batch (one
    more step: batch 3; with 2 batches a step, two more steps: batch 6); Lightning's total counted the steps left
    ("3/1", "6/2")."""
    bar = ["--trainer.enable_progress_bar", "true", "--data.batch_size", "1", "--data.seeds_per_prompt", "2",
           "--trainer.accumulate_grad_batches", str(accumulate)]
    main(["fit", "--config", str(config), *bar, "--trainer.max_steps", str(steps[0])])
    capsys.readouterr()
    main(["fit", "--config", str(config), *bar, "--trainer.max_steps", str(steps[1]), "--ckpt_path", "last"])
    shown = capsys.readouterr().out
    assert re.search(rf"Epoch 0 .* {last_batch}/{last_batch} ", shown) and not re.search(r" \d/[12] ", shown), shown


def test_a_ctrl_c_while_the_command_starts_is_one_line_and_exit_130(config, monkeypatch, capsys):
    """Before Lightning handles Ctrl-C itself (imports, parsing, building the model), Python would print a traceback."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("fnf.cli.load_plugins", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == "fnf: interrupted"


def test_a_command_without_a_config_file_points_to_one(capsys):
    message = _fail(["fit"], capsys)
    assert "the following arguments are required: fit.model.rewards (a config file sets them: --config " in message
