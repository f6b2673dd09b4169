"""The ``fnf fit / validate / test / predict / scan / preview`` commands the README and docs/ show still parse: a
renamed option or class would otherwise leave the guides wrong without any test failing."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fnf.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSED = ("fit", "validate", "test", "predict", "scan", "preview")  # the commands with --print_config
LAUNCHERS = ("srun",)


def fnf_words(line: str) -> list[str]:
    """The line's words from ``fnf`` on, past environment assignments and a launcher (``srun``; torchrun's options
    up to ``-m fnf.cli``, which is ``fnf``); [] if not fnf."""
    words = shlex.split(line, comments=True)
    while words and ("=" in words[0] or words[0] in LAUNCHERS):
        words.pop(0)
    if words[:1] == ["torchrun"] and "fnf.cli" in words:
        words = ["fnf", *words[words.index("fnf.cli") + 1:]]
    return words if words[:1] == ["fnf"] else []


def shown_commands(page: Path) -> list[str]:
    """Every ``fnf <PARSED command>`` line of the page's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = fnf_words(line)
            if words[1:2] and words[1] in PARSED and "--help" not in words:
                commands.append(line)
    return commands


COMMANDS = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in shown_commands(page)]


def test_the_pages_show_trainer_commands():
    pages = {page for page, _ in COMMANDS}
    assert {"README.md", "docs/usage.md", "docs/scale-and-reliability.md"} <= pages, pages
    assert len(COMMANDS) >= 17


@pytest.mark.parametrize("page, line", COMMANDS, ids=[f"{page}:{i}" for i, (page, _) in enumerate(COMMANDS)])
def test_a_shown_command_parses(page, line, capsys, monkeypatch):
    """Parsed as the CLI parses it, up to ``--print_config`` (nothing is built or run); placeholders such as
    ``...`` or ``$RUN`` in a checkpoint path are only strings to the parser."""
    monkeypatch.chdir(ROOT)  # the pages' paths are relative to the repository root
    argv = fnf_words(line)[1:]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--print_config"])
    assert stopped.value.code in (0, None), f"{page}: {line}\n{capsys.readouterr().err}"
    assert "model:" in capsys.readouterr().out
