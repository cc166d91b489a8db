"""Per-model JSON files that methods read (MInference's patterns, DuoAttention's head splits).

A method's `config=` names either a file or a shipped one by model name, which lives in a folder
under kvlife/configs/. Problems are one-line SpecErrors that say what to run instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvlife.errors import SpecError
from kvlife.models import CONFIG_ROOT, shipped_files

shipped = shipped_files  # names of the shipped files in a folder (their model names)
__all__ = ["CONFIG_ROOT", "read_json", "resolve", "shipped"]


def resolve(name_or_path: str, folder: Path, method: str, label: str, hint: str) -> Path:
    """A file path, or the shipped `folder/<name>.json`; else a SpecError ending with `hint`."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    named = folder / f"{name_or_path}.json"
    if "/" not in name_or_path and named.is_file():
        return named
    raise SpecError(f"{method}: {label} {name_or_path!r} not found: not a file, and not a shipped "
                    f"{label.split()[-1]} ({', '.join(shipped(folder)) or 'none'}); {hint}")


def read_json(path: str | Path, method: str, label: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{method}: cannot read {label} {path}: {str(exc).splitlines()[0]}") from None
