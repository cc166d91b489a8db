"""A run's predictions.jsonl: one JSON row per sample and turn, appended a whole sample at a time.

Appends are flushed and fsynced, so a killed run loses at most the sample in flight; a torn last
line (a killed writer) is ignored when read and terminated before the next append.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a predictions.jsonl; a torn last line (a killed writer) is ignored."""
    rows = []
    if not path.exists():
        return rows
    with path.open() as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    # Terminate a torn line a killed writer may have left, then append whole lines and fsync.
    with path.open("ab+") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write("".join(json.dumps(row) + "\n" for row in rows).encode())
        handle.flush()
        os.fsync(handle.fileno())


def sample_done(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(task, sample id) of every sample with rows written."""
    return {(row["task"], row["sample_id"]) for row in rows}
