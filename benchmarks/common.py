"""What every benchmark script records and prints: the machine, the commit measured, a plain table.

Scripts run as `python benchmarks/NAME.py`, so `from common import machine, commit, print_table`
finds this file beside them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).parent


def machine() -> str:
    """CPU model, cores, memory and system, e.g. "AMD EPYC 7B13, 2 cpus, 8 GiB, Linux (no GPU)"."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cpus, {mem:.0f} GiB, {platform.system()} ({_gpu() or 'no GPU'})"


def _gpu() -> str | None:
    torch = sys.modules.get("torch")  # loaded by the benchmarks that could use a GPU; never loaded here
    return torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None


def commit() -> str:
    """HEAD's short hash, "+dirty" when src/ differs from it (the code measured); "unknown" outside git."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "../src") else "")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> None:
    """Aligned columns: text to the left, numbers (already formatted or not) to the right."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)
        ).rstrip()

    if title:
        print(title)
    print(line(list(headers)))
    for row in cells:
        print(line(row))


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return text in ("-", "")
    return True
