"""Prompt files: ``.txt`` (one prompt per line), ``.csv`` (a prompt column, optional seed / category) and ``.jsonl``
(``{"prompt": ..., "seed": ..., "category": ...}``) -> rows; anything unusable is one error naming the file and line."""

import csv
import io
from pathlib import Path
from typing import Any, NamedTuple

from fnf.jsonl import json_objects

MAX_SEED = 2**63 - 1  # seeds must fit a LongTensor
SUFFIXES = (".txt", ".csv", ".jsonl")


class PromptFileError(ValueError):
    """A prompt file is unusable; the message names the file (and line)."""


class MissingPromptFileError(PromptFileError, FileNotFoundError):
    """The prompt file does not exist (also catchable as ``FileNotFoundError``)."""


def _seed(value: Any, where: str) -> int:
    """Validate a seed given in a file (CSV cells arrive as text)."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise PromptFileError(f"{where}: seed must be an integer in [0, 2**63), got {value!r}")
    return value


def _prompt(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PromptFileError(f"{where}: 'prompt' must be a string, got {value!r}")
    if not value.strip():
        raise PromptFileError(f"{where}: empty prompt")
    return value.strip()


class PromptRow(NamedTuple):
    prompt: str
    seed: int | None
    category: str | None = None
    """Optional label (jsonl key / csv column ``category``): evaluation reports metrics per category."""


def _category(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise PromptFileError(f"{where}: 'category' must be a string, got {value!r}")
    return value.strip()


def read_prompts(path: str | Path, csv_column: str = "prompt") -> list[PromptRow]:
    """Parse a ``.txt``/``.csv``/``.jsonl`` prompt file into rows of (prompt, seed or None, category or None)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(f"{path}: unsupported prompt file type {path.suffix!r}, expected one of {SUFFIXES}")
    if path.is_dir():
        raise PromptFileError(f"{path}: a folder; expected a prompt file")
    if not path.is_file():
        raise MissingPromptFileError(f"{path}: prompt file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PromptFileError(f"{path}:{line}: not valid UTF-8 text") from None

    rows: list[PromptRow] = []
    if suffix == ".txt":
        for line in text.split("\n"):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append(PromptRow(line.strip(), None))
    elif suffix == ".jsonl":
        for where, obj in json_objects(text, path, PromptFileError, example='{"prompt": "...", "seed": 0}'):
            seed = _seed(obj["seed"], where) if obj.get("seed") is not None else None
            if "prompt" not in obj:
                raise PromptFileError(f'{where}: no "prompt" key (keys: {", ".join(obj) or "none"})')
            rows.append(PromptRow(_prompt(obj["prompt"], where), seed, _category(obj.get("category"), where)))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if columns and csv_column not in columns:
            raise PromptFileError(f"{path}: no {csv_column!r} column (data.csv_column); found columns {columns}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # csv.DictReader's key for cells past the header's columns
                raise PromptFileError(f"{where}: {len(columns) + len(row[None])} cells, the header has {len(columns)} "
                                      "columns; quote a prompt that contains a comma (\"a, b\")")
            cell = row.get("seed")
            seed = _seed(cell, where) if cell is not None and cell.strip() else None
            rows.append(PromptRow(_prompt(row[csv_column] or "", where), seed, _category(row.get("category"), where)))
    if not rows:
        raise PromptFileError(f"{path}: no prompts found (expected at least one)")
    return rows
