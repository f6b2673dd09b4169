"""``fnf fit|validate|test|predict --config configs/<task>.yaml``: LightningCLI over FocusNFix
(and ``fnf report RUN ...``, see fnf/report.py; ``fnf rahf-train ...``, see fnf/rahf/cli.py;
``fnf rahf-convert ...``, see fnf/rahf/convert.py).

Reward heads and regularizers are chosen by ``class_path`` (any importable subclass); the built-ins
imported here also resolve by their short class name. A config file can import code, exactly like
any LightningCLI config: only run configs you trust.
"""

from __future__ import annotations

import signal
import sys
from argparse import ArgumentError
import warnings
from pathlib import Path

import yaml

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import fnf.regularizers  # noqa: F401  (short names for built-in regularizers)
import fnf.rewards  # noqa: F401  (short names for built-in reward heads)
from fnf.callbacks import ImageGridLogger, LoraExporter, PngWriter
from fnf.data import PromptDataModule
from fnf.module import FocusNFix
from fnf.preemption import PreemptionCheckpoint
from fnf.resume import claim_version_folder, export_if_complete, resume_last


class FnfCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ImageGridLogger, "image_logger")
        parser.add_lightning_class_args(LoraExporter, "lora_export")
        parser.add_lightning_class_args(PngWriter, "predict_writer")
        # Mid-epoch checkpoints by default: last.ckpt (LoRA, optimizer, loops, RNG) every N optimizer steps.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.every_n_train_steps": 50, "checkpoint.save_last": True,
                             "checkpoint.save_top_k": 0})

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # the default checkpoint callback would contradict it
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        """``--ckpt_path last``: the newest last.ckpt under ``trainer.default_root_dir``, continuing its run folder;
        no ckpt_path: a version folder of its own, even when other runs start in the same root at the same moment;
        a checkpoint already at max_steps: say so, restore a missing LoRA export, and stop."""
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self.config_init["fit"]["ckpt_path"] = resume_last(self.trainer)
        elif ckpt_path is None:
            claim_version_folder(self.trainer)
        complete = ckpt_path is not None and Path(ckpt_path).is_file()
        if complete and export_if_complete(self.trainer, self.model, ckpt_path):
            sys.exit(0)


def check_config_files(args: list[str]) -> None:
    """Name the file when a ``--config`` is missing or not YAML (jsonargparse reports neither by file name)."""
    for flag, path in zip(args, args[1:]):
        if flag in ("-c", "--config"):
            try:
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except OSError as error:
                raise FileNotFoundError(f"--config {path}: {error.strerror or error}") from None
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                where = getattr(error, "problem_mark", None)
                line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
                raise ValueError(f"--config {path}: not valid YAML{line} "
                                 f"({getattr(error, 'problem', None) or type(error).__name__})") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"--config {path}: expected a mapping of sections (model:, data:, trainer:, ...), "
                                 f"got {'an empty file' if loaded is None else type(loaded).__name__}")


JSONARGPARSE_WRAPPING = ("Problem with given class_path", "Does not validate", "Subtypes:", "Errors:", "Expected a", "Given value", "Not a valid subclass",
                         "Subclass types expect", "a class path", "a dict ")


def cause(error: Exception) -> str:
    """One line: jsonargparse nests a failed instantiation's real message inside Union / subclass reports."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(JSONARGPARSE_WRAPPING)]
    return (causes or lines or [type(error).__name__])[0]


def parser_error(error: ArgumentError) -> str:
    """jsonargparse's nested 'Parser key "k":' report -> 'k.sub: <the innermost reason>' on one line."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    keys = [line.removeprefix('Parser key "').removesuffix('":') for line in lines if line.startswith('Parser key "')]
    reasons = [line for line in lines if not line.startswith(('Parser key "', "Problem with given class_path"))]
    return f"{'.'.join(keys)}: {reasons[-1]}" if keys and reasons else cause(error)


def main(args: list[str] | None = None) -> None:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # Frozen text encoder, VAE and reward heads stay in eval mode on purpose (FocusNFix.train).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["report"]:  # not a Lightning subcommand: reads what fit / test wrote
            from fnf.report import main as report

            return report(argv[1:])
        if argv[:1] == ["rahf-train"]:  # training of the RAHF reward model: its own LightningCLI
            from fnf.rahf.cli import main as rahf_train

            return rahf_train(argv[1:])
        if argv[:1] == ["rahf-convert"]:  # the public RAHF reproduction's checkpoint -> .safetensors
            from fnf.rahf.convert import main as rahf_convert

            return rahf_convert(argv[1:])
        check_config_files(argv)
        FnfCLI(FocusNFix, PromptDataModule, args=args,  # args None: LightningCLI reads sys.argv itself
               save_config_kwargs={"overwrite": True},
               parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},  # parse errors: one line below
               trainer_defaults={"plugins": {"class_path": "fnf.checkpoint_io.AtomicCheckpointIO"},  # no torn files
                                 "callbacks": [PreemptionCheckpoint()]})
    except SIGTERMException:  # Lightning stopped after the step; PreemptionCheckpoint has saved it
        sys.exit(128 + signal.SIGTERM)
    except ArgumentError as error:  # unknown keys, wrong types: jsonargparse's message, without the usage text
        sys.exit(f"fnf: error: {parser_error(error)}")
    except (ValueError, OSError, FloatingPointError) as error:  # OSError: missing / unwritable paths, full disk
        sys.exit(f"fnf: error: {cause(error)}")


if __name__ == "__main__":
    main()
