"""Bad input ends in one line on stderr: ``fnf: error: <key or file>: <what is expected>``, exit code 1.

Every command (``fnf fit|validate|test|predict``, ``fnf rahf-train``) runs inside ``one_line_errors``. Errors
fnf raises on purpose (ValueError, OSError, FloatingPointError) already name the key or file; others (a bug, a
library failing deep inside, a plugin breaking the reward contract) get their type and a hint. ``FNF_DEBUG=1`` lets every error through with
its full traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import inspect
import os
import re
import signal
import sys
from argparse import ArgumentError
from contextlib import contextmanager
from pathlib import Path

import yaml

DEBUG_VARIABLE = "FNF_DEBUG"
EXPECTED = (ValueError, OSError, FloatingPointError)  # raised with a message written for the user
JSONARGPARSE_WRAPPING = ("Problem with given class_path", "Does not validate", "Subtypes:", "Errors:", "Expected a",
                         "Given value", "Not a valid subclass", "Subclass types expect", "a class path", "a dict ")


class OneLineParser(argparse.ArgumentParser):
    """argparse for fnf's own commands: a usage error is one line through ``one_line_errors`` (exit 1), not the
    usage text and exit 2; a mistyped flag is named with the closest known one (argparse would first report the
    required flag it hides: ``--formt diffusers`` as "required: --format"), and flags are never abbreviated (as
    in ``fnf fit``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.given: list[str] = []

    def parse_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        known = [flag for action in self._actions for flag in action.option_strings]
        mistyped = [word.split("=")[0] for word in self.given if word.startswith("--")
                    and word.split("=")[0] not in known]
        raise ValueError(unknown(mistyped[0], known) if mistyped else message)


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


def cause(error: BaseException) -> str:
    """One line: jsonargparse nests a failed instantiation's real message inside Union / subclass reports."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(JSONARGPARSE_WRAPPING)]
    return (causes or lines or [type(error).__name__])[0]


def parser_error(error: ArgumentError, known_keys: list[str] = (), argv: list[str] = ()) -> str:
    """jsonargparse's nested 'Parser key "k":' report -> 'k.sub: <the innermost reason>' on one line; an unknown
    key gets the closest known ones as a suggestion. ``argv``: the command line, to name a flag whole."""
    lines = [line.strip().removeprefix("- ") for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "does not accept option '" in line:  # a key in a config file
            return unknown(line.split("option '", 1)[1].split("'", 1)[0], known_keys)
        if line.startswith("unrecognized arguments:"):  # a --flag on the command line
            flags = [word for word in line.split()[2:] if word.startswith("--")]
            if flags and flags[0][2:3].isdigit():  # --model.rewards.0.weight reaches here as --0.weight
                tail = "." + flags[0].split("=")[0][2:]  # .0.weight
                flag = next((word.split("=")[0] for word in argv if word.split("=")[0].endswith(tail)), flags[0])
                return (f"{flag}: list items cannot be set by index on the command line; set the list in the config "
                        "file, or pass it whole (e.g. --model.rewards '[{head: ...}]')")
            if flags:
                return unknown(flags[0].split("=")[0], [f"--{key}" for key in known_keys])
    keys = [line.removeprefix('Parser key "').removesuffix('":') for line in lines if line.startswith('Parser key "')]
    if keys and (argument := unknown_argument(str(error))):
        return f"{'.'.join(keys)}: {argument}"
    if keys and (name := re.search(r"Expected a dot import path string: (\S+)", str(error))):
        return unknown_class(".".join(keys), name[1])
    if help_of := re.fullmatch(r"(--[\w.]+\.help): Expected a dot import path string: (\S+)", str(error).strip()):
        return unknown_class(help_of[1], help_of[2])  # --model.regularizer.help MistypedClass
    missing = re.search(r"class_path '([\w.]+)':\s+module '([\w.]+)' has no attribute '(\w+)'", str(error))
    if keys and missing and missing[1] == f"{missing[2]}.{missing[3]}":  # the class_path's own class, not an import
        return f"{'.'.join(keys)}: {missing_class(missing[2], missing[3])}"
    if keys and (base := re.search(r"Import path (\S+ )?does not correspond to a subclass of (\w+)", str(error))):
        path = base[1] or (re.search(r"Given value: (\S+)", str(error)) or [None, "the class"])[1]
        return f"{'.'.join(keys)}: {path.strip()} is not a {base[2]} subclass"
    if keys and (mismatch := type_mismatch(lines)):
        return f"{'.'.join(keys)}: {mismatch}"
    reasons = [line for line in lines if not line.startswith(('Parser key "', "Problem with given class_path"))]
    real = [line for line in reasons if not line.startswith(JSONARGPARSE_WRAPPING)]  # e.g. No module named 'x'
    return f"{'.'.join(keys)}: {(real or reasons)[0 if real else -1]}" if keys and reasons else cause(error)


def type_mismatch(lines: list[str]) -> str | None:
    """'Expected a <type>. Got value: v' (or 'Expected float or null. Got value: v') from the innermost key's report:
    jsonargparse states a Union's types one per line, then the value (a nested one as its internal repr at the outer
    level), and the caller would otherwise quote that last line alone."""
    inner = lines[max(i for i, line in enumerate(lines) if line.startswith('Parser key "')) + 1:]
    if inner and re.fullmatch(r"Expected a .+\. Got value: .*", inner[0]):
        return inner[0]
    given = next((i for i, line in enumerate(inner) if line.startswith("Given value: ")), None)
    expected = [type_name(line.removeprefix("Expected a ")) for line in inner[:given] if line.startswith("Expected a ")]
    if given is None or not expected or any(not line.startswith(JSONARGPARSE_WRAPPING) for line in inner[:given]):
        return None
    value = inner[given].removeprefix("Given value: ")
    return f"Expected {', '.join(expected[:-1])} or {expected[-1]}. Got value: {value}"


def type_name(reported: str) -> str:
    """jsonargparse's "<class 'float'>" as float, NoneType as null, "typing.Literal['a', 'b']" as one of ['a', 'b']."""
    if plain := re.fullmatch(r"<class '(\w+)'>", reported):
        return "null" if plain[1] == "NoneType" else plain[1]
    if choices := re.fullmatch(r"typing\.Literal\[(.*)\]", reported):
        return f"one of [{choices[1]}]"
    return reported


def unknown_class(key: str, name: str) -> str:
    """'<key>: unknown class <name>; did you mean <closest short name>?' (or where to look) for a class named by
    its short name that no imported reward head or regularizer has."""
    from fnf.plugins import UNIMPORTABLE

    close = difflib.get_close_matches(name, short_class_names(), n=2, cutoff=0.6)
    listed = ("; `fnf rewards` lists the heads usable by name" if "rewards" in key
              else "; a class of your own: its full class_path, e.g. my_package.module.MyClass")
    listed = f"; its plugin is installed but {UNIMPORTABLE[name]}" if name in UNIMPORTABLE else listed
    return f"{key}: unknown class {name}" + (f"; did you mean {' or '.join(close)}?" if close else listed)


def missing_class(module: str, name: str) -> str:
    """'<module> has no class <name>; did you mean <closest>?' for a mistyped class_path."""
    try:
        classes = [key for key, value in vars(importlib.import_module(module)).items() if inspect.isclass(value)]
    except ImportError:
        classes = []
    close = difflib.get_close_matches(name, classes, n=2, cutoff=0.6)
    return f"{module} has no class {name}" + (f"; did you mean {' or '.join(f'{module}.{c}' for c in close)}?"
                                               if close else "")


def short_class_names() -> list[str]:
    """The reward heads and regularizers a config may name by class name alone (those imported so far)."""
    from fnf.plugins import concrete_subclasses
    from fnf.regularizers import Regularizer
    from fnf.rewards.base import RewardHead

    return sorted({cls.__name__ for base in (RewardHead, Regularizer) for cls in concrete_subclasses(base)})


def unknown_argument(report: str) -> str | None:
    """'<class> has no argument 'x'; did you mean y?' for a mistyped key under a class's ``init_args`` (jsonargparse
    buries it in a Union report and then prints the whole value), else None."""
    option = re.search(r"Option '([^']+)' is not accepted", report)
    paths = list(re.finditer(r"class_path[ =]'([^']+)'", report))
    if option is None or not paths:
        return None
    before = [path for path in paths if path.start() < option.start()]
    class_path = before[-1] if before else paths[0]  # the class whose report holds the option, or the value's
    try:
        module, _, name = class_path[1].rpartition(".")
        accepted = list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        accepted = []
    close = difflib.get_close_matches(option[1], accepted, n=2, cutoff=0.6)
    hint = f" (it takes: {', '.join(accepted)})" if accepted else ""
    if close:
        hint = f"; did you mean {' or '.join(close)}?"
    return f"{class_path[1]} has no argument {option[1]!r}{hint}"


def constructing(error: BaseException, kinds: tuple[type, ...]) -> type | None:
    """The outermost object of one of ``kinds`` whose ``__init__`` was running when ``error`` was raised (the
    component a config named), read from the traceback; None if there is none."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__init__" and isinstance(tb.tb_frame.f_locals.get("self"), kinds):
            return type(tb.tb_frame.f_locals["self"])
        tb = tb.tb_next
    return None


def unknown(key: str, known_keys: list[str]) -> str:
    close = difflib.get_close_matches(key, known_keys, n=2, cutoff=0.75)
    return f"{key}: unknown key" + (f"; did you mean {' or '.join(close)}?" if close else "")


def peer_lost(error: BaseException) -> str | None:
    """What a collective, or the rendezvous store while the processes connect, reported when another process of the
    run died (kill -9, out of memory, a lost node, a SIGTERM to the launcher as the run starts)."""
    text = str(error)
    distributed = sys.modules.get("torch.distributed")  # its DistNetworkError / DistStoreError: "Broken pipe"
    from_store = distributed is not None and isinstance(error, getattr(distributed, "DistError", ()))
    if not (from_store or isinstance(error, RuntimeError) and any(w in text for w in ("gloo", "NCCL", "ProcessGroup"))):
        return None
    return text.split("] ", 1)[-1].split(". ")[0]  # "[.../pair.cc:545] Read error [addr]: Connection reset by peer. ..."


IN_COMPONENT = "raised in "  # the note naming the reward head or regularizer an error came from
HINT = "fnf hint: "  # a note saying what the user can do about a failed write, appended to its line


@contextmanager
def named_component(name: str):
    """Errors raised inside carry ``name`` (a reward head, a regularizer: the innermost one when heads wrap heads),
    so that their one line says where they came from."""
    try:
        yield
    except Exception as error:
        if component(error) is None:
            error.add_note(IN_COMPONENT + name)
        raise


def component(error: BaseException) -> str | None:
    return next((note.removeprefix(IN_COMPONENT) for note in getattr(error, "__notes__", ())
                 if note.startswith(IN_COMPONENT)), None)


def one_line(error: BaseException) -> str:
    """The error as one line for the user, prefixed with the reward head or regularizer it was raised in (unless
    the message names it already)."""
    line, where = _one_line(error), component(error)
    if "'off'" in line and line.rstrip(".").endswith("Got value: False"):  # YAML 1.1 reads a bare off as false
        line += ' (YAML reads a bare off as false: quote it, "off")'
    if re.match(r"the following arguments are required: (fit|validate|test|predict)\.", line):  # no config file
        line += " (a config file sets them: --config configs/artifacts.yaml, or one of configs/)"
    return f"{where}: {line}" if where and where.rsplit(" ", 1)[-1] not in line else line


def _one_line(error: BaseException) -> str:
    if (lost := peer_lost(error)) is not None:
        return (f"a training process stopped ({lost}); the first error in the processes' output is the cause; "
                "--ckpt_path last resumes from the last checkpoint, if one was written")
    if (failed_write := _write_error(error)) is not None:
        return failed_write
    if isinstance(error, ArgumentError):
        return parser_error(error)
    if isinstance(error, EXPECTED) or _lightning_configuration(error):
        return cause(error)
    return f"{type(error).__name__}: {cause(error)} (set {DEBUG_VARIABLE}=1 for the full traceback)"


WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for this process's file-size limit (ulimit -f)"}
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an errno


def _write_error(error: BaseException) -> str | None:
    """A write that failed for want of room, as what happened and to which file."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (match := OS_ERROR_IN_TEXT.search(str(error))):
        code = int(match[1])
    if code not in WRITE_ERRORS:
        return None
    hints = "".join(f"; {note.removeprefix(HINT)}" for note in getattr(error, "__notes__", ())
                    if note.startswith(HINT))
    return f"{WRITE_ERRORS[code]}: {getattr(error, 'filename', None) or '(the file being written)'}{hints}"


def _lightning_configuration(error: BaseException) -> bool:
    """Lightning's MisconfigurationException, about trainer settings: looked up where Lightning is loaded, so the
    tools that train nothing (``fnf report``) start without it."""
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    return exceptions is not None and isinstance(error, exceptions.MisconfigurationException)


@contextmanager
def one_line_errors(program: str = "fnf"):
    """Turn any exception into ``<program>: error: <one line>`` and exit code 1, and a Ctrl-C that reaches here (one
    while the command starts, before Lightning handles them) into ``<program>: interrupted`` and 130, as a shell
    reports SIGINT (``FNF_DEBUG=1``: re-raise either)."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        if isinstance(error, KeyboardInterrupt):
            print(f"\n{program}: interrupted", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        sys.exit(f"{program}: error: {one_line(error)}")
