"""The scan file ``fnf scan`` writes, and ``data.filter``, which trains on the items it found the base model failing on.

One JSON line per (prompt, seed) item of a prompt file::

    {"prompt": "a red circle top left", "seed": 7, "scores": {"ShapesArtifact": -0.41},
     "mask_area": {"ShapesArtifact": 0.031}, "union_mask_area": 0.031,
     "settings": {"pretrained": "embedded:shapes-t2i", "sampler": {"num_steps": 20, ...}, "masks": {...}, ...}}

``scores``: each reward head's base score r_i(I0, c); ``mask_area``: the fraction of pixels in its mask M_i(I0)
(null for a head with ``mask: none``); ``union_mask_area``: that of max_i M_i (null when no head has a mask);
``settings``: what else the values depend on (model, sampler, mask post-processing, each head's mask source), so
that rows scanned with other settings are never mixed: a scan refuses to append to them, the filter to read them.
Every process of a scan appends its rows under an exclusive lock, one write per batch, after cutting off a line
another process left torn; so a stopped scan can leave only a torn last line, which the next scan cuts off (and
redoes that item) and the filter refuses.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from fnf.jsonl import json_objects

ROW_KEYS = ("prompt", "seed", "scores", "mask_area", "union_mask_area", "settings")
FILTERED_OUT = "filtered_out"
"""The ``category`` of filtered-out items in the validation set (``filtered_out: validate``)."""


@contextmanager
def _locked(path: Path, mode: str) -> Iterator[IO[bytes]]:
    """``path`` opened in ``mode`` under an exclusive lock (every rank of a DDP scan appends to the same file)."""
    with open(path, mode) as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes
        yield file


def _parse(text: bytes, path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a scan file (not UTF-8 text; fnf scan writes JSON lines)") from None
    for where, row in json_objects(decoded, path):
        if set(ROW_KEYS) - row.keys() or not isinstance(row["scores"], dict):
            raise ValueError(f"{where}: not a scan row: expected the keys {', '.join(ROW_KEYS)} "
                             "(fnf scan writes them)")
        if not isinstance(row["seed"], int) or isinstance(row["seed"], bool):
            raise ValueError(f"{where}: seed must be an integer (the seed of the item's x_T), got {row['seed']!r}")
        rows.append(row)
    return rows


def _cut_torn_line(file: IO[bytes]) -> None:
    """Truncate a torn last line (no newline: its writer stopped mid-write), reading only the file's tail. A last
    line that is not the start of a row (``{``) is no torn row: the file is not a scan file, and stays as it is."""
    end = file.seek(0, 2)
    position, line_start = end, 0
    while position > 0:
        start = max(0, position - 4096)
        file.seek(start)
        tail = file.read(position - start)
        if position == end and tail.endswith(b"\n"):
            return
        newline = tail.rfind(b"\n")
        if newline >= 0:
            line_start = start + newline + 1
            break
        position = start
    file.seek(line_start)
    if end > line_start and file.read(1) != b"{":
        raise ValueError(f"{file.name}: not a scan file (its last line is not a scan row; fnf scan writes JSON lines)")
    file.truncate(line_start)


def read_rows(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of a scan file. A torn last line (no newline: a scan stopped while writing it) is an error, or with
    ``repair`` (the scan itself, before it continues) cut off, so that its item is scanned again."""
    path = Path(path)
    if repair and not path.exists():
        return []  # a new scan: its file is created with its first rows, so a scan failing before leaves none
    with _locked(path, "a+b" if repair else "rb") as file:
        if repair:
            _cut_torn_line(file)
        file.seek(0)
        text = file.read()
    if text and not text.endswith(b"\n"):
        raise ValueError(f"{path}: the last line is incomplete (a scan stopped while writing it); "
                         f"finish the scan: fnf scan ... --out {path}")
    return _parse(text, path)


def append_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append rows in one write, after cutting off a line another process left torn (killed while writing it: its
    item then has no row and is scanned again on resume), so no row ever lands inside another."""
    if rows:
        with _locked(Path(path), "a+b") as file:
            _cut_torn_line(file)
            file.write("".join(json.dumps(row, allow_nan=False) + "\n" for row in rows).encode("utf-8"))


def settings_difference(found: dict[str, Any], expected: dict[str, Any],
                        prefix: str = "") -> tuple[str, str, str] | None:
    """The first setting that differs: (dotted key, found value, expected value) as JSON; None when all are equal."""
    for key in sorted(found.keys() | expected.keys()):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            difference = settings_difference(a, b, f"{prefix}{key}.")
            if difference:
                return difference
        elif a != b:
            return f"{prefix}{key}", json.dumps(a), json.dumps(b)
    return None


def scan_settings(module, head_args: list[dict] | None) -> dict[str, Any]:
    """The settings of ``module`` (a ``FocusNFix``) a row's scores and mask areas depend on besides its prompt and
    seed, as JSON types: ``fnf scan`` writes them into every row, and a fit's ``data.filter`` must train with them.
    ``head_args``: each head's class_path and init_args from the config (weights and thresholds change scores)."""
    sampler, masks = module.sampler.args, asdict(module.mask_args)
    del masks["empty"]  # a scan keeps empty masks whatever the config says (PromptScanner.on_predict_start)
    return {"pretrained": module.hparams["pretrained"],
            "sampler": {"num_steps": sampler.num_steps, "guidance_scale": sampler.guidance_scale,
                        "resolution": module.sampler.resolution},
            "masks": masks,
            "heads": {name: {"mask": term.mask, "threshold": term.threshold, "clean_score": term.clean_score,
                             "head": args}
                      for name, term, args in zip(module.head_names, module.terms,
                                                  head_args or [None] * len(module.terms))}}


def check_scanned_with(path: str, settings: dict[str, Any]) -> None:
    """``data.filter``: the scan's rows were made with the settings this fit trains with; items another model, sampler
    or mask found failing are not what this run should train on. (A missing or torn file is the filter's to report.)"""
    try:
        rows = read_rows(Path(path))
    except (OSError, ValueError):
        return
    difference = settings_difference(rows[0]["settings"], settings) if rows else None
    if difference:
        key, theirs, ours = difference
        raise ValueError(f"data.filter.scan: {path} was scanned with {key}={theirs}, this config trains with {ours}; "
                         "scan data.train_file with this config (`fnf scan --config ... --out` another file)")


def row_key(item: dict[str, Any]) -> tuple[str, int]:
    """What identifies an item and its row: the prompt and the seed of its x_T."""
    return item["prompt"], int(item["seed"])


@dataclass
class ScanFilter:
    """Train on the (prompt, seed) items whose base image a ``fnf scan`` found wrong; an item is kept when it meets
    every criterion given. Items, not prompts: each seed of a prompt has its own x_T, hence its own base image."""

    scan: str
    """Scan file written by ``fnf scan`` for this config's ``data.train_file`` (with the same ``data.seed`` and
    ``data.seeds_per_prompt``, so that every training item has its row)."""
    head: str | None = None
    """Reward head the criteria read, by its name in the scan rows (e.g. ShapesArtifact); null: mask_area_above
    reads the union mask of all heads (score_below needs a head)."""
    score_below: float | None = None
    """Keep items whose base score r(I0, c) of ``head`` is below this (null: no score criterion)."""
    mask_area_above: float | None = None
    """Keep items whose base mask (of ``head``, else the union) covers more than this fraction of the pixels:
    0.0 keeps every item with a non-empty mask (null: no mask criterion)."""
    filtered_out: Literal["drop", "validate"] = "drop"
    """Items that fail: drop (unused), or validate: added to the validation set with category ``filtered_out``, so
    that validation (with the Evaluation callback) also reports, per category, what training does to prompts the
    base model already got right (forgetting). They come on top of the validation file's (``data.val_items``)."""

    def __post_init__(self) -> None:
        if not self.scan:
            raise ValueError("data.filter.scan: the scan file written by `fnf scan` is required")
        if self.score_below is None and self.mask_area_above is None:
            raise ValueError("data.filter: set score_below and/or mask_area_above (the criteria an item must meet)")
        if self.score_below is not None and self.head is None:
            raise ValueError("data.filter.head: score_below reads the score of one reward head; name it")
        if self.mask_area_above is not None and not 0.0 <= self.mask_area_above < 1.0:
            raise ValueError(f"data.filter.mask_area_above must be a fraction of the pixels in [0, 1), "
                             f"got {self.mask_area_above}")

    def split(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(kept, filtered out) items, each in file order; every item must have its row in the scan file."""
        path = Path(self.scan)
        if not path.is_file():
            raise FileNotFoundError(f"data.filter.scan: {path}: scan file not found; write it with "
                                    f"`fnf scan --config ... --out {path}`")
        try:
            rows = {row_key(row): row for row in read_rows(path)}
        except ValueError as error:  # a torn or foreign file: name the key too
            raise ValueError(f"data.filter.scan: {error}") from None
        settings = next(iter(rows.values()))["settings"] if rows else {}
        for row in rows.values():
            difference = settings_difference(row["settings"], settings)
            if difference:
                key, found, first = difference
                raise ValueError(f"data.filter.scan: {path} mixes rows scanned with different settings ({key}: {first} "
                                 f"and {found}); scan into one file per setting")
        missing = [item for item in items if row_key(item) not in rows]
        if missing:
            first = missing[0]
            raise ValueError(f"data.filter.scan: {path} has no row for {len(missing)} of the {len(items)} training "
                             f"items (first: {first['prompt']!r}, seed {first['seed']}); scan data.train_file with "
                             "the same data.seed and data.seeds_per_prompt")
        if self.head is not None:
            for row in (rows[row_key(item)] for item in items):
                if self.head not in row["scores"]:
                    raise ValueError(f"data.filter.head: no head {self.head!r} in {path}; its heads: "
                                     f"{', '.join(row['scores'])}")
        kept = [item for item in items if self.keeps(rows[row_key(item)], path)]
        kept_keys = {row_key(item) for item in kept}
        if not kept:
            raise ValueError(f"data.filter: none of the {len(items)} training items meets the criteria in {path}")
        return kept, [item for item in items if row_key(item) not in kept_keys]

    def keeps(self, row: dict[str, Any], path: Path) -> bool:
        if self.score_below is not None and not row["scores"][self.head] < self.score_below:
            return False
        if self.mask_area_above is not None:
            area = row["mask_area"].get(self.head) if self.head is not None else row["union_mask_area"]
            if area is None:
                what = f"head {self.head} has no mask" if self.head is not None else "no head has a mask"
                raise ValueError(f"data.filter.mask_area_above: {what} in {path} (mask: none); use score_below")
            return area > self.mask_area_above
        return True
