"""``fnf fit|validate|test|predict --config configs/<task>.yaml``: LightningCLI over FocusNFix; ``fnf report``,
``export``, ``preview``, ``scan``, ``rewards``, ``rahf-train``, ``rahf-convert``: the modules in ``fnf.commands.TOOLS``.

Reward heads and regularizers are chosen by ``class_path`` (any importable subclass); the built-ins imported
here and the classes of installed plugins (``fnf.rewards`` / ``fnf.regularizers`` entry points) also resolve by their
short class name.
A config file can import code, exactly like any LightningCLI config: only run configs you trust.
"""

from __future__ import annotations

import itertools
import sys
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

import fnf.regularizers  # noqa: F401  (short names for built-in regularizers)
import fnf.rewards  # noqa: F401  (short names for built-in reward heads)
from fnf.callbacks import ImageGridLogger, LoraExporter, PngWriter
from fnf.checkpoint_io import AtomicCheckpointIO, RunCheckpoint, check_room_for_checkpoints
from fnf.commands import EPILOG, TOOLS, check_command, configure, exit_code, run_tool, sigterm_unwinds
from fnf.compute import ComputeArgs, frozen_dtype
from fnf.csv_metrics import keep_csv_metrics
from fnf.data import PromptDataModule
from fnf.errors import check_config_files, constructing, one_line, one_line_errors, parser_error
from fnf.module import FocusNFix
from fnf.plugins import load_plugins
from fnf.preemption import PreemptionCheckpoint
from fnf.progress_bar import default_progress_bar
from fnf.regularizers import Regularizer
from fnf.rewards.base import RewardHead
from fnf.scan_file import check_scanned_with, scan_settings
from fnf.recipe import RunRecipe, check_settings, json_types, run_recipe
from fnf.resume import continue_run_folder, export_if_complete, find_last, is_run_last, remove_killed_writes
from fnf.run_claims import (AUTO_LOCK, RunFolderGuard, check_fresh_run_folder, checkpoints_parent, claim_folder_in_root,
                            claim_version_folder, folder_to_lock, keeps_run_folders, lock_run_folder,
                            remove_if_unstarted, use_run_folder)


def checkpoint_dirpath(config) -> str | None:
    """The config's ``checkpoint.dirpath``: a run's checkpoints outside ``trainer.default_root_dir``."""
    return (config.get("checkpoint") or {}).get("dirpath")


def started_on_their_own(trainer) -> bool:
    """All ranks exist before the run starts (torchrun, srun), rather than started by Lightning from rank 0."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.world_size > 1 and environment is not None and environment.creates_processes_externally


class RunCLI(LightningCLI):
    """LightningCLI as fnf's commands run it: a mistyped key gets the closest known one; a run folder of its own,
    settled with every rank (fnf.run_claims.RunFolderGuard); a run that fails before its first training step (a config
    error, a SIGTERM while it starts) leaves no version folder behind, one stopped later keeps its logs."""

    claimed = None  # the version folder this run created (removed again if the run fails before training)
    new_folders: list[Path] = []  # default_root_dir and its parents this run created (removed again if left empty)
    guard = None  # fnf.run_claims.RunFolderGuard: rank 0's run folder problem or lock, settled in setup
    starts_over = False  # --ckpt_path auto found no checkpoint: a new run, one at a time in the root (AUTO_LOCK)

    def settle_run_folder(self, prepare: Callable[[], Path | None], check: Callable[[], None] = lambda: None) -> None:
        """Rank 0's ``prepare`` claims the run's folder and returns the folder to lock (or None); rank 0 locks it
        before anything is written there, then runs ``check`` (no other run's files there). An error is raised at
        once where the other ranks do not exist yet; where they do (torchrun, srun), rank 0 drops its loggers
        (nothing written) and every rank raises it in setup."""
        problem, locks = None, []
        root = Path(self.trainer.default_root_dir).absolute()
        self.new_folders = list(itertools.takewhile(lambda folder: not folder.exists(), (root, *root.parents)))
        try:
            if self.starts_over and self.trainer.global_rank == 0:  # --ckpt_path auto found no checkpoint
                locks.append(lock_run_folder(root, name=AUTO_LOCK))
            folder = prepare()
            if folder is not None and self.trainer.global_rank == 0:
                saver = self.trainer.checkpoint_callback
                own = saver is not None and saver.dirpath and folder == folder_to_lock(Path(saver.dirpath))
                locks.append(lock_run_folder(folder, "checkpoint.dirpath" if own else "trainer.default_root_dir"))
            if self.trainer.global_rank == 0:
                check()
        except (ValueError, OSError) as error:
            for lock in locks:
                lock.close()
            if not started_on_their_own(self.trainer):
                raise
            problem, self.trainer.loggers, locks = error, [], []
        self.guard = RunFolderGuard(problem, locks)  # every rank adds one: its collective in setup pairs up
        self.trainer.callbacks.insert(0, self.guard)

    def claim_run_folder(self) -> None:
        """A version folder of this run's own (no lock: evaluation and rahf-train runs); with MLflow, W&B, ... first
        (one save dir shared by runs), ``<default_root_dir>/lightning_logs/version_N`` for its files."""
        def claim() -> None:
            self.claimed = claim_version_folder(self.trainer)
            if not keeps_run_folders(self.trainer):
                self.claimed = self.claimed or claim_folder_in_root(self.trainer)
                if self.claimed is not None:
                    use_run_folder(self.trainer, self.claimed)

        self.settle_run_folder(claim)
        if self.trainer.global_rank == 0:
            keep_csv_metrics(self.trainer.loggers, None)  # a folder of its own: nothing to delete, nothing to warn of

    def parse_arguments(self, parser, args) -> None:
        """Unknown keys get a close-match suggestion from the subcommand's own keys."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            argv = sys.argv[1:] if args is None else args
            subcommands = parser._subcommands_action._name_parser_map
            known = list(subcommands[argv[0]].get_defaults().keys()) if argv[:1] and argv[0] in subcommands else []
            raise ValueError(parser_error(error, known, argv)) from None

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            with sigterm_unwinds(until_lightning=True):  # while it starts: the claimed folder is removed
                super()._run_subcommand(subcommand)
        except BaseException as error:
            if subcommand != "fit" or self.trainer.global_step == 0:  # a fit that trained keeps its logs
                remove_if_unstarted(self.claimed, self.new_folders)
            problem = self.guard.problem if self.guard is not None else None
            if problem is not None and problem is not error:  # the cause, whatever else then failed
                raise problem from error
            raise
        finally:
            if self.guard is not None:
                self.guard.release()  # the run folder is free for a later --ckpt_path last


COMMAND_HELP = {  # Lightning's help for its commands is their docstrings' first lines, cut mid-sentence
    "fit": "train the LoRA (Focus-N-Fix steps); checkpoints, and the LoRA export at the end",
    "validate": "base vs tuned images of data.val_file: the Evaluation callback's metrics",
    "test": "base vs tuned images of data.test_file: metrics, and test_samples/ for fnf report",
    "predict": "tuned and base images of data.predict_file as PNGs (predict_writer.output_dir)",
}


CALLBACK_KEYS = {ImageGridLogger: "image_logger", LoraExporter: "lora_export", PngWriter: "predict_writer",
                 RunCheckpoint: "checkpoint"}
"""The callbacks fnf's commands configure, and their config keys (``add_lightning_class_args``)."""


class FnfCLI(RunCLI):
    continues_run = False  # ckpt_path is a run's last.ckpt (found by last / auto, or given): continue its folder
    saved_recipe = None  # the --ckpt_path checkpoint's recipe (fnf.recipe.run_recipe)
    saved_step = None  # and its global step (read once: a checkpoint at max_steps is not trained again)
    saved_log_dir = None  # and the log dir of its run
    run_folder = None  # rank 0: this run's folder (checkpoints, LoRA export), settled in before_fit

    def add_arguments_to_parser(self, parser) -> None:
        for callback, key in CALLBACK_KEYS.items():  # RunCheckpoint: one last.ckpt per run, at its final step too
            parser.add_lightning_class_args(callback, key)
        # Mid-epoch checkpoints by default: last.ckpt (LoRA, optimizer, loops, RNG) every N optimizer steps.
        parser.set_defaults({"checkpoint.every_n_train_steps": 50, "checkpoint.save_last": True,
                             "checkpoint.save_top_k": 0, "checkpoint.enable_version_counter": False})

    def _add_subcommands(self, parser, **kwargs) -> None:
        kwargs = {command: {"description": line, **kwargs.get(command, {})} for command, line in COMMAND_HELP.items()}
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:  # the lines of fnf --help
            choice.help = COMMAND_HELP[choice.dest]

    def _parse_ckpt_path(self) -> None:
        """``ckpt_path``: ``last`` (the newest last.ckpt under trainer.default_root_dir, required) or ``auto`` (the
        same, else a new run) resolved to a file, loaded with one-line errors, and its model settings compared with
        the config's (Lightning would overwrite the config with the checkpoint's settings without a word)."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None or config.get("ckpt_path") is None:
            return
        dirpath = checkpoint_dirpath(config)
        if config.ckpt_path in ("last", "auto"):
            root = config.trainer.default_root_dir or "."
            config.ckpt_path = find_last(root, required=config.ckpt_path == "last" or subcommand != "fit",
                                         max_steps=config.trainer.max_steps if subcommand == "fit" else None,
                                         dirpath=dirpath)
            self.starts_over = config.ckpt_path is None
            if config.ckpt_path is None:
                return
        self.continues_run = subcommand == "fit" and is_run_last(config.ckpt_path, config.trainer.default_root_dir,
                                                                 dirpath)
        if _is_sharded_checkpoint(Path(config.ckpt_path)):  # a distributed (DCP) checkpoint: the strategy reads it
            return
        checkpoint = AtomicCheckpointIO().load_checkpoint(config.ckpt_path)  # any other folder: refused here
        self.saved_recipe = checkpoint.get("fnf_recipe") or {"model": checkpoint.get("hyper_parameters", {})}
        self.saved_step = checkpoint.get("global_step", 0)
        self.saved_log_dir = checkpoint.get("fnf_log_dir")
        saved, ours = {**self.saved_recipe}, run_recipe(config)  # the trainer's part: before_fit (it needs one)
        saved.pop("trainer", None)
        if subcommand != "fit":  # evaluation: other data and devices are its own business
            ours, saved = {"model": ours["model"]}, {"model": saved.get("model", {})}
        changed = check_settings(ours, saved, config.ckpt_path, resuming=subcommand == "fit")
        if changed:
            rank_zero_info(f"fnf: {subcommand} with settings that differ from the checkpoint's: {', '.join(changed)}")

    def before_instantiate_classes(self) -> None:
        """Settings that cannot train (no step to take, a precision) fail before the model loads (minutes for a large
        one)."""
        config = self.config.get(self.config.get("subcommand")) or self.config
        max_steps = (config.get("trainer") or {}).get("max_steps")
        if self.config.get("subcommand") == "fit" and max_steps is not None and (max_steps == 0 or max_steps < -1):
            raise ValueError(f"trainer.max_steps must be >= 1 (or -1: no limit), got {max_steps}")
        accelerator = (config.get("trainer") or {}).get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():  # Lightning: "No supported gpu backend"
            raise ValueError(f"trainer.accelerator={accelerator}: no CUDA device here (torch.cuda.is_available() is "
                             "False); use cpu or auto")
        if config.get("model") is not None and config.model.get("compute") is not None:
            frozen_dtype(ComputeArgs(**config.model.compute.as_dict()), config.trainer.precision or "32-true")
        if self.config.get("subcommand") == "predict" and config.get("predict_writer"):  # checked again when it writes
            PngWriter.check_folder(Path(config.predict_writer.output_dir))

    def instantiate_classes(self) -> None:
        """A reward head, regularizer or callback that fails to construct is named (its errors rarely say which it
        is): a callback by its config key (``checkpoint: Invalid value for every_n_train_steps=-5 ...``)."""
        try:
            super().instantiate_classes()
        except Exception as error:
            callback = constructing(error, tuple(CALLBACK_KEYS))
            if callback is not None:
                key = CALLBACK_KEYS[next(c for c in CALLBACK_KEYS if issubclass(callback, c))]
                line = one_line(error)
                raise ValueError(line if line.startswith(key) else f"{key}: {line}") from error
            component = constructing(error, (RewardHead, Regularizer))
            if component is None:
                raise
            line = one_line(error)
            named = line.startswith(component.__name__)  # the head said its name itself
            raise ValueError(line if named else f"{component.__module__}.{component.__qualname__}: {line}") from error

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if config.get("enable_checkpointing") is False:  # the default checkpoint callback would contradict it
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        bar = default_progress_bar(config.get("enable_progress_bar"), [*callbacks, *configured])
        return super()._instantiate_trainer(config, callbacks if bar is None else [*callbacks, bar])

    def before_fit(self) -> None:
        """A run's last.ckpt (last / auto, or its path) continues its run folder; any other run, one starting from
        another checkpoint too, gets a version folder of its own, even when other runs start in the same root at the
        same moment; a checkpoint already at max_steps: say so, restore a missing LoRA export, and stop."""
        ckpt_path = self.config_init["fit"].get("ckpt_path")
        if self.datamodule.filter is not None:  # items another model or mask found failing are another selection
            heads = [term["head"] for term in json_types(self.config["fit"]["model"].as_dict()["rewards"])]
            check_scanned_with(self.datamodule.filter.scan, scan_settings(self.model, heads))
        ours = run_recipe(self.config["fit"], self.trainer)
        if self.saved_recipe is not None and "trainer" in self.saved_recipe:  # the global batch: processes resolved
            check_settings({"trainer": ours["trainer"]}, {"trainer": self.saved_recipe["trainer"]}, ckpt_path, True)

        saver = self.trainer.checkpoint_callback
        chosen_dirpath = saver.dirpath if saver is not None else None  # before use_run_folder sets the default

        def prepare() -> Path | None:  # the folder to lock: a --ckpt_path last started meanwhile is refused
            if saver is not None and self.trainer.global_rank == 0:
                folder, key = ((saver.dirpath, "checkpoint.dirpath") if saver.dirpath else
                               (self.trainer.default_root_dir, "trainer.default_root_dir"))
                check_room_for_checkpoints(folder, self.model.model.lora_parameters(), key)
            if self.continues_run:
                run = continue_run_folder(self.trainer, ckpt_path, self.saved_log_dir)
                lock = folder_to_lock(Path(ckpt_path).resolve().parent)  # the folder of the run's checkpoints
            else:
                self.claimed = claim_version_folder(self.trainer)
                if not keeps_run_folders(self.trainer):  # MLflow, W&B, ... first: a folder under the root still
                    self.claimed = self.claimed or claim_folder_in_root(self.trainer)
                if ckpt_path is not None:
                    rank_zero_info(f"fnf: a new run from {ckpt_path} (not a last.ckpt under "
                                   "trainer.default_root_dir); its own run stays as it was")
                lock = checkpoints_parent(self.trainer, self.claimed) if self.trainer.global_rank == 0 else None
                run = self.claimed or lock
            self.run_folder = run
            if run is not None and not keeps_run_folders(self.trainer):
                use_run_folder(self.trainer, run)
            return lock

        def check_fresh() -> None:  # a new run: no earlier run's checkpoints or logs where it writes its own
            if not self.continues_run:
                check_fresh_run_folder(self.trainer, self.claimed, chosen_dirpath)

        self.settle_run_folder(prepare, check_fresh)
        if self.continues_run and self.guard.files:  # rank 0, holding the run's lock
            remove_killed_writes(self.trainer, ckpt_path, self.run_folder)
        if self.trainer.global_rank == 0 and self.guard.problem is None:
            keep_csv_metrics(self.trainer.loggers, self.saved_step if self.continues_run else None)
        self.trainer.callbacks.append(RunRecipe(ours))  # for a later resume
        complete = self.saved_step is not None and 0 <= self.trainer.max_steps <= self.saved_step  # not a DCP folder
        if complete and self.guard.problem is None:
            export_if_complete(self.trainer, self.model, ckpt_path, self.run_folder)
            sys.exit(0)

    def _before_evaluation(self, subcommand: str) -> None:
        """A version folder of its own (removed again if the run fails), and a note when no checkpoint is given."""
        self.claim_run_folder()
        if self.config_init[subcommand].get("ckpt_path") is None:
            rank_zero_info(f"fnf: {subcommand} without --ckpt_path: the LoRA as initialised, so tuned = base; "
                           "--ckpt_path last takes the newest checkpoint under trainer.default_root_dir")

    def before_validate(self) -> None:
        self._before_evaluation("validate")

    def before_test(self) -> None:
        self._before_evaluation("test")

    def before_predict(self) -> None:
        self._before_evaluation("predict")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    configure(argv)
    with one_line_errors():
        if argv[:1] and argv[0] in TOOLS:
            return run_tool(argv)
        check_command(argv)
        load_plugins()  # installed heads and regularizers resolve by short name in YAML
        check_config_files(argv)
        preemption = PreemptionCheckpoint()
        try:
            FnfCLI(FocusNFix, PromptDataModule, args=args,  # args None: LightningCLI reads sys.argv itself
                   save_config_kwargs={"overwrite": True},
                   auto_configure_optimizers=False,  # model.optimizer over the LoRA; --optimizer would replace it
                   parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False,  # parse errors: one line
                                  "allow_abbrev": False,  # --trainer.max_step is a typo, not --trainer.max_steps
                                  "description": "Focus-N-Fix fine-tuning (LightningCLI)", "epilog": EPILOG},
                   trainer_defaults={"plugins": {"class_path": "fnf.checkpoint_io.AtomicCheckpointIO"},  # no torn files
                                     "callbacks": [preemption]})
        except SIGTERMException:  # Lightning stopped after the step; PreemptionCheckpoint has saved it
            sys.exit(exit_code(preemption.signal))
        except SystemExit:
            if preemption.interrupted:  # a second Ctrl-C, after which Lightning exits with 1
                sys.exit(exit_code(preemption.signal))
            raise


if __name__ == "__main__":
    main()
