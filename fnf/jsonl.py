"""JSON Lines files (prompts, RichHF records, scan results): one object per non-blank line; a bad line is named
by file and line number."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_objects(text: str, path: Path, error: type[Exception] = ValueError,
                 example: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` per non-blank line of ``text`` (read from ``path``); ``where`` is ``path:line``.
    Raises ``error`` on a line that is not JSON or not an object (``example`` shows the expected shape)."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as problem:
            raise error(f"{where}: not valid JSON ({problem.msg} at column {problem.colno})") from None
        if not isinstance(value, dict):
            raise error(f"{where}: expected a JSON object{f' like {example}' if example else ''}, "
                        f"got {type(value).__name__}")
        yield where, value
