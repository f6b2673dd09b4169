"""The ``fnf`` command: ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (``fnf.cli``); the tools
in ``TOOLS`` start without it. Importing Lightning takes seconds (it imports torchmetrics, which imports
torchvision, transformers and scipy), and ``fnf report`` needs none of that."""

from __future__ import annotations

import difflib
import importlib
import logging
import signal
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext

from fnf.errors import check_config_files, one_line_errors

TOOLS = {  # fnf <tool> ...: commands beside Lightning's, each a module with main(argv)
    "report": ("fnf.report", "one HTML page from tested runs"),
    "export": ("fnf.export_formats", "a run's LoRA as diffusers / kohya files or a fused model"),
    "preview": ("fnf.preview", "the masks training would use, on base images, before training"),
    "scan": ("fnf.scan", "base-model scores and mask areas per prompt, for data.filter"),
    "rewards": ("fnf.plugins", "the reward heads usable by short name, built-in and installed"),
    "rahf-train": ("fnf.rahf.cli", "train the RAHF reward model (its own LightningCLI)"),
    "rahf-convert": ("fnf.rahf.convert", "the public RAHF reproduction's checkpoint -> .safetensors"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
WRITERS = ("export", "report", "preview", "scan")  # tools whose staging files SIGTERM must not leave behind
EPILOG = "other commands (fnf <command> --help): " + "; ".join(f"{name}: {what}" for name, (_, what) in TOOLS.items())


def check_command(argv: list[str]) -> None:
    """A mistyped command is one line with the closest ones (argparse would list Lightning's four only)."""
    if not argv:
        raise ValueError(f"no command; expected one of {', '.join([*LIGHTNING_COMMANDS, *TOOLS])} (fnf --help)")
    if not argv[0].startswith("-") and argv[0] not in (*LIGHTNING_COMMANDS, *TOOLS):
        close = difflib.get_close_matches(argv[0], [*LIGHTNING_COMMANDS, *TOOLS], n=2, cutoff=0.6)
        raise ValueError(f"{argv[0]}: unknown command" + (f"; did you mean {' or '.join(close)}?" if close else "")
                         + f" (commands: {', '.join([*LIGHTNING_COMMANDS, *TOOLS])})")


def configure(argv: list[str]) -> None:
    """Settings every fnf command runs with, the tools that parse ``fnf fit``'s config too (preview, scan)."""
    from jsonargparse import set_parsing_settings

    # Option help from the attribute docstrings of the config's dataclasses: reading them parses the source of every
    # class a command's parser covers (~2 s a command), so only for a command that prints help.
    set_parsing_settings(docstring_parse_attribute_docstrings=prints_docs(argv))
    # Frozen text encoder, VAE and reward heads stay in eval mode on purpose (FocusNFix.train).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Mid-epoch resume is exact: the loader skips the epoch's trained batches itself (fnf/resume.py, tested).
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # Evaluation logs metrics torchmetrics has already reduced over the processes (fnf/evaluation.py): no sync_dist.
    warnings.filterwarnings("ignore", r"It is recommended to use `self.log\('(validate|test)_eval/")
    # Lightning 2.6's own use of torch 2.14's deprecated LeafSpec (lightning/pytorch/utilities/_pytree.py): nothing
    # a user can change.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # A run from another run's checkpoint, or an evaluation of one, restores the model and its own steps; the other
    # run's checkpoint callback (its folder, best scores) is not this run's.
    warnings.filterwarnings("ignore", r"The dirpath has changed from")
    warnings.filterwarnings("ignore", r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(no_advertisement)


def prints_docs(argv: list[str]) -> bool:
    """Whether the command line asks for help: ``-h``, ``--help`` or a class's ``--<key>.help``."""
    options = [a.split("=", 1)[0] for a in argv]
    return any(o in ("-h", "--help") or o.startswith("--") and o.endswith(".help") for o in options)


def no_advertisement(record: logging.LogRecord) -> bool:
    """Lightning's tip to install its hosted logger, printed by every run without it."""
    return not record.getMessage().startswith("💡 Tip")


def run_tool(argv: list[str]) -> None:
    """``fnf <tool> ...``: the tool module's ``main`` with the rest of the arguments."""
    unwinds = sigterm_unwinds() if argv[0] in WRITERS else nullcontext()  # rahf-train: Lightning's own
    with unwinds:
        importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])


def exit_code(signum: int) -> int:
    return 128 + signum


def _exit(signum: int, frame) -> None:
    sys.exit(exit_code(signum))


def _exit_until_lightning(signum: int, frame) -> None:
    """Unwind while this is the process's handler; once Lightning's run loop has installed its own (which calls this
    one after it), do nothing, so that Lightning's handling stands (in fnf fit, PreemptionCheckpoint's)."""
    if signal.getsignal(signum) is _exit_until_lightning:
        _exit(signum, frame)


@contextmanager
def sigterm_unwinds(until_lightning: bool = False):
    """SIGTERM raises ``SystemExit(143)`` instead of ending the process on the spot, so that ``finally`` blocks run:
    the tools remove their staging folders, as they do on Ctrl-C (``fnf export``, ``report``, ``preview``,
    ``scan``), and a run stopped while it starts removes the folder it claimed. ``until_lightning``: only until
    Lightning installs its own handler. Signal handlers belong to the main thread: elsewhere, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_until_lightning if until_lightning else _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    with one_line_errors():
        if argv[:1] and argv[0] in TOOLS:
            configure(argv)
            return run_tool(argv)
        check_command(argv)  # a typo is answered at once, not after Lightning's import
        check_config_files(argv)  # as is a --config file that is missing or not YAML
        from fnf.cli import main as lightning_main  # here: a Ctrl-C during its seconds of imports is one line too
    lightning_main(args)
