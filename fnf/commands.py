"""The ``fnf`` command: ``fit``, ``validate``, ``test`` and ``predict`` go to LightningCLI (``fnf.cli``); the tools
in ``TOOLS`` start without it. Importing Lightning takes seconds (it imports torchmetrics, which imports
torchvision, transformers and scipy), and ``fnf report`` needs none of that."""

from __future__ import annotations

import difflib
import importlib
import signal
import sys
from contextlib import contextmanager, nullcontext

from fnf.errors import one_line_errors

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


def run_tool(argv: list[str]) -> None:
    """``fnf <tool> ...``: the tool module's ``main`` with the rest of the arguments."""
    unwinds = sigterm_unwinds() if argv[0] in WRITERS else nullcontext()  # rahf-train: Lightning's own
    with unwinds:
        importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])


def exit_code(signum: int) -> int:
    return 128 + signum


@contextmanager
def sigterm_unwinds():
    """SIGTERM raises ``SystemExit(143)`` instead of ending the process on the spot, so that the tools' ``finally``
    blocks remove their staging folders, as they do on Ctrl-C (``fnf export``, ``report``, ``preview``, ``scan``)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(exit_code(signum)))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    with one_line_errors():
        if argv[:1] and argv[0] in TOOLS:
            return run_tool(argv)
        check_command(argv)  # a typo is answered at once, not after Lightning's import
    from fnf.cli import main as lightning_main

    lightning_main(args)
