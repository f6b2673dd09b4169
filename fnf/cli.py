"""``fnf fit|validate|test|predict --config configs/<task>.yaml``: LightningCLI over FocusNFix.

Reward heads and regularizers are chosen by ``class_path`` (any importable subclass); the built-ins
imported here also resolve by their short class name. A config file can import code, exactly like
any LightningCLI config: only run configs you trust.
"""

from __future__ import annotations

import sys
import warnings

from jsonargparse import set_docstring_parse_options
from lightning.pytorch.cli import LightningCLI

import fnf.regularizers  # noqa: F401  (short names for built-in regularizers)
import fnf.rewards  # noqa: F401  (short names for built-in reward heads)
from fnf.callbacks import ImageGridLogger, LoraExporter, PngWriter
from fnf.checkpoint_io import AtomicCheckpointIO
from fnf.data import PromptDataModule
from fnf.module import FocusNFix


class FnfCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ImageGridLogger, "image_logger")
        parser.add_lightning_class_args(LoraExporter, "lora_export")
        parser.add_lightning_class_args(PngWriter, "predict_writer")


def main(args: list[str] | None = None) -> None:
    set_docstring_parse_options(attribute_docstrings=True)
    # Frozen text encoder, VAE and reward heads stay in eval mode on purpose (FocusNFix.train).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    try:
        FnfCLI(FocusNFix, PromptDataModule, args=args, save_config_kwargs={"overwrite": True},
               parser_kwargs={"parser_mode": "omegaconf"},
               trainer_defaults={"plugins": [AtomicCheckpointIO()]})  # complete checkpoints or none
    except (ValueError, OSError, FloatingPointError) as error:  # OSError: missing / unwritable paths, full disk
        sys.exit(f"fnf: error: {error}")


if __name__ == "__main__":
    main()
