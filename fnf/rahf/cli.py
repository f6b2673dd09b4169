"""``fnf rahf-train fit|validate|test --config configs/rahf/<name>.yaml``: LightningCLI over RAHF training.

Trains the RAHF model (``fnf.rewards.rahf``) on RichHF-18K-format jsonl files (``fnf.rahf.data``) and writes
``rahf.safetensors`` for the ``RAHFHeatmap`` reward head. Errors are one line, as in ``fnf`` (``fnf.cli``).
"""

from __future__ import annotations

import sys
import warnings

from jsonargparse import set_parsing_settings

from fnf.cli import RunCLI
from fnf.errors import check_config_files, one_line_errors
from fnf.rahf.data import RichHFDataModule
from fnf.rahf.module import RAHFTraining


class RAHFCLI(RunCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.config.image_size", "data.image_size")  # one resolution for model and data

    def before_fit(self) -> None:
        self.claim_run_folder()  # removed again if the run fails before training

    before_validate = before_test = before_fit


def main(args: list[str] | None = None) -> None:
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = sys.argv[1:] if args is None else args
    # fnf rahf-train passes its arguments on (fnf.commands.TOOLS): Lightning would warn that sys.argv holds them too.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    with one_line_errors("fnf rahf-train"):
        check_config_files(argv)
        RAHFCLI(RAHFTraining, RichHFDataModule, args=args,  # args None: LightningCLI reads sys.argv itself
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False,  # parse errors: one line
                               "prog": "fnf rahf-train"},
                trainer_defaults={"plugins": {"class_path": "fnf.checkpoint_io.AtomicCheckpointIO"}})


if __name__ == "__main__":
    main()
