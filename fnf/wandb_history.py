"""The logged history of a W&B run, read from its ``run-<id>.wandb`` file offline (wandb 0.31 has no Python reader).

The file is W&B's transaction log: a 7-byte header (``:W&B``, key 0xBEE1, version 0), then LevelDB-log framing
in 32 KiB blocks: each chunk a 7-byte header (CRC-32 of type byte + payload, little-endian length, type: 1 full,
2 first, 3 middle, 4 last), a block's tail under 7 bytes zero padding. The payloads are wandb's own protobuf
``Record`` messages; ``history`` records carry one logged row each. A run killed mid-write ends in a partial
chunk: reading stops there, as W&B's own sync does.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
CHUNK = struct.Struct("<IHB")  # crc, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[bytes]:
    """The serialized ``Record`` messages of one ``.wandb`` file, in order."""
    data = path.read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B run file (expected the header {HEADER!r}, found {data[:7]!r})")
    position, pending = len(HEADER), b""
    while position + CHUNK.size <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK.size:
            position += left_in_block
            continue
        crc, length, kind = CHUNK.unpack_from(data, position)
        start, position = position + CHUNK.size, position + CHUNK.size + length
        if kind == 0 or position > len(data):  # zero fill or a chunk cut off by a crash: the end of the log
            return
        payload = data[start:position]
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"{path}: corrupt record at byte {start - CHUNK.size} (checksum mismatch)")
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {start - CHUNK.size}")


def history(path: Path) -> Iterator[dict[str, float]]:
    """Each logged row's numeric values by key (nested keys joined with ``/``, as W&B shows them)."""
    try:
        from wandb.proto.wandb_internal_pb2 import Record
    except ImportError:
        raise ModuleNotFoundError(f"{path}: reading a W&B run needs wandb: pip install -e '.[loggers]'") from None

    for serialized in records(path):
        record = Record.FromString(serialized)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            value = json.loads(item.value_json)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[item.key or "/".join(item.nested_key)] = float(value)
        yield row
